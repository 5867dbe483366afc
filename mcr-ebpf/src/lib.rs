#![no_std]
// The library target lets `mcr` declare a build dependency on this crate, so cargo rebuilds
// `mcr` when the eBPF sources change.
