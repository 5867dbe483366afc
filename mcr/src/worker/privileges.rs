//! How a worker gives up everything it inherited from the privileged supervisor.

use anyhow::{Context as _, bail};
use caps::CapSet;
use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};

const ALL_SETS: [CapSet; 5] = [
    CapSet::Ambient,
    CapSet::Bounding,
    CapSet::Effective,
    CapSet::Inheritable,
    CapSet::Permitted,
];

/// Becomes `uid`/`gid` with no supplementary groups, every capability set empty (bounding set
/// included) and `no_new_privs`, then checks that this is so.
pub fn drop_to(uid: u32, gid: u32) -> anyhow::Result<()> {
    if uid == 0 {
        bail!("refusing to run a worker as root");
    }
    // The bounding set can only shrink while CAP_SETPCAP is still effective, so first.
    caps::clear(None, CapSet::Bounding).context("clearing the bounding capability set")?;
    caps::clear(None, CapSet::Ambient).context("clearing the ambient capability set")?;
    caps::clear(None, CapSet::Inheritable).context("clearing the inheritable capability set")?;
    setgroups(&[]).context("dropping supplementary groups")?;
    let gid = Gid::from_raw(gid);
    setresgid(gid, gid, gid).context("switching group")?;
    let uid = Uid::from_raw(uid);
    // Leaving uid 0 for a non-zero uid clears the permitted and effective sets.
    setresuid(uid, uid, uid).context("switching user")?;
    nix::sys::prctl::set_no_new_privs().context("setting no_new_privs")?;

    for set in ALL_SETS {
        let left =
            caps::read(None, set).with_context(|| format!("reading {set:?} capabilities"))?;
        if !left.is_empty() {
            bail!("{set:?} capabilities remain after dropping privileges: {left:?}");
        }
    }
    if nix::unistd::getuid().is_root() || nix::unistd::geteuid().is_root() {
        bail!("still root after dropping privileges");
    }
    Ok(())
}
