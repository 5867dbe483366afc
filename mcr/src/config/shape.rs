//! Bounds on the shape of a YAML document, checked in one streaming pass before the full parse:
//! how deep collections nest, and how many nodes the document holds once its aliases are
//! expanded.
//!
//! Both bounds protect the parse that follows. `serde_yaml`'s scanner (unsafe-libyaml) spends
//! time proportional to the nesting depth on every token, so its parse time grows with the
//! square of the depth. `mcr check` on a 2-core VM, before this check and with it:
//!
//! | file                                     | debug build      | release build   |
//! |------------------------------------------|------------------|-----------------|
//! | 240,000 `[` (240 KB), never closed       | 12.3 s → 0.02 s  | 2.6 s → 0.00 s  |
//! | `rules: ` + 16,000 `[` and 16,000 `]`    | 4.8 s → 0.02 s   | 1.0 s → 0.00 s  |
//! | `rules: ` + 240,000 `[` and 240,000 `]`  | > 300 s → 0.01 s | 492 s → 0.00 s  |
//!
//! `serde_yaml` also keeps every event of a document before it looks at any, and replays every
//! alias it meets: 16 MiB of one-letter values took 1 GB (now 21 MB: refused at
//! [`MAX_NODES`]), and 262 KB of anchors and aliases standing for 9 million outputs took
//! 5.5 s and 440 MB (now refused in 0.01 s).
//!
//! The events come from libyaml itself, the parser `serde_yaml` runs (`events.rs`), so the
//! depth measured here is the depth that parser sees, and this pass holds one event at a time.
//! It stops at the first event past a bound, having scanned at most about 1 KiB further, so it
//! takes time linear in the length of the text. (yaml-rust2, which the line index used before,
//! reads ahead to the end of a `[...]` or `{...}` before it returns its first event: 1.7 GB for
//! the 16 MiB file above.)

use std::collections::HashMap;

use super::{
    Problem,
    events::{Anchor, Event, Events},
};

/// Deepest nesting of mappings and sequences. MCR's schema needs 5 (the document, `rules`, a
/// rule, its `outputs`, an output).
pub const MAX_DEPTH: usize = 32;

/// Most values (scalars, mappings and sequences) in the document with every alias expanded.
/// The largest valid rules file (4,096 rules, 16,384 outputs) has about 220,000.
pub const MAX_NODES: u64 = 500_000;

/// A collection whose end has not been seen yet.
struct Open {
    anchor: Option<Anchor>,
    /// Nodes counted before it began.
    nodes_before: u64,
}

/// Checks that `text` is YAML that nests no deeper than [`MAX_DEPTH`] and expands to no more
/// than [`MAX_NODES`] nodes.
pub fn check(text: &str) -> Result<(), Problem> {
    let mut open: Vec<Open> = Vec::new();
    // Expanded size of each anchored node whose end has been seen.
    let mut anchored: HashMap<Anchor, u64> = HashMap::new();
    let mut nodes: u64 = 0;
    for item in Events::new(text) {
        let (event, line) = item.map_err(|error| Problem {
            line: Some(error.line),
            field: String::new(),
            message: error.message,
        })?;
        let problem = |message: String| Problem {
            line: Some(line),
            field: String::new(),
            message,
        };
        match event {
            Event::Scalar { anchor, .. } => {
                nodes += 1;
                if let Some(anchor) = anchor {
                    anchored.insert(anchor, 1);
                }
            }
            Event::SequenceStart { anchor } | Event::MappingStart { anchor } => {
                if open.len() == MAX_DEPTH {
                    return Err(problem(format!(
                        "mappings and sequences nest deeper than {MAX_DEPTH} levels (a rules \
                         file needs 5); the file is not read further"
                    )));
                }
                // From here on the name refers to this node, which is not complete yet.
                if let Some(anchor) = &anchor {
                    anchored.remove(anchor);
                }
                open.push(Open {
                    anchor,
                    nodes_before: nodes,
                });
                nodes += 1;
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some(Open {
                    anchor: Some(anchor),
                    nodes_before,
                }) = open.pop()
                {
                    anchored.insert(anchor, nodes - nodes_before);
                }
            }
            Event::Alias { anchor } => {
                // libyaml passes on an alias whose anchor is unknown or still open; serde_yaml
                // refuses the first and replays the second, over and over, until its limits.
                let Some(&size) = anchored.get(&anchor) else {
                    return Err(problem(format!(
                        "alias *{} refers to no complete node before it",
                        String::from_utf8_lossy(&anchor)
                    )));
                };
                nodes = nodes.saturating_add(size);
            }
            Event::Boundary => {}
        }
        if nodes > MAX_NODES {
            return Err(problem(format!(
                "the document holds more than {MAX_NODES} values once its aliases are \
                 expanded (a rules file needs far fewer); the file is not read further"
            )));
        }
    }
    Ok(())
}
