//! `cargo xtask package`: the Debian package, built with cargo-deb (installed here at a pinned
//! version), with its man pages and shell completions generated from the CLI's definition.
//! `--check` then installs it on this machine with `dpkg -i`, checks what an administrator
//! would use (`mcr check` on the shipped rules, the man pages, the unit with `systemd-analyze
//! verify`, the `mcr` user) and purges it again.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};
use clap::CommandFactory as _;
use clap_complete::Shell;

use crate::{output, run, setup};

/// cargo-deb version the package is built with.
const CARGO_DEB_VERSION: &str = "3.8.0";
/// Where the generated pages and completions, and the package, are written.
const OUT_DIR: &str = "target/package";

/// Debian tools the installed package is checked with.
const CHECK_TOOLS: [&str; 3] = [
    "systemd", // systemd-analyze verify, systemd-sysusers
    "man-db",  // man -l
    "bash-completion",
];

/// Files the package must install (besides the copyright and the README).
const INSTALLED: [&str; 13] = [
    "/usr/sbin/mcr",
    "/etc/mcr/rules.yaml",
    "/usr/lib/sysusers.d/mcr.conf",
    "/usr/share/man/man8/mcr.8.gz",
    "/usr/share/man/man8/mcr-run.8.gz",
    "/usr/share/man/man8/mcr-check.8.gz",
    "/usr/share/man/man8/mcr-stats.8.gz",
    "/usr/share/man/man8/mcr-status.8.gz",
    "/usr/share/man/man8/mcr-reload.8.gz",
    "/usr/share/man/man5/mcr-rules.5.gz",
    "/usr/share/bash-completion/completions/mcr",
    "/usr/share/zsh/vendor-completions/_mcr",
    "/usr/share/fish/vendor_completions.d/mcr.fish",
];

/// Builds the package; with `check`, installs it, checks it and purges it.
pub fn run_package(check: bool) -> anyhow::Result<()> {
    let package = build()?;
    println!("xtask: built {}", package.display());
    if check {
        check_installed(&package)?;
    }
    Ok(())
}

fn build() -> anyhow::Result<PathBuf> {
    ensure_cargo_deb()?;
    run(Command::new("cargo").args(["build", "--release", "--package", "mcr"]))?;
    let out = Path::new(OUT_DIR);
    let _ = fs::remove_dir_all(out);
    write_man_pages(&out.join("man"))?;
    write_completions(&out.join("completions"))?;
    let listing = output(Command::new("cargo").args([
        "deb",
        "--package",
        "mcr",
        "--no-build",
        "--output",
        OUT_DIR,
    ]))
    .context("cargo deb failed (run `cargo deb --package mcr --no-build` to see why)")?;
    let package = listing
        .lines()
        .map(str::trim)
        .rfind(|line| Path::new(line).extension().is_some_and(|ext| ext == "deb"))
        .with_context(|| format!("cargo deb did not name the package it wrote: {listing}"))?;
    Ok(PathBuf::from(package))
}

/// Installs cargo-deb at [`CARGO_DEB_VERSION`] unless that version is there.
fn ensure_cargo_deb() -> anyhow::Result<()> {
    let installed = output(Command::new("cargo").args(["deb", "--version"])).unwrap_or_default();
    if installed
        .split_whitespace()
        .any(|word| word == CARGO_DEB_VERSION)
    {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-deb {CARGO_DEB_VERSION} (a few minutes, once)");
    run(Command::new("cargo").args([
        "install",
        "cargo-deb",
        "--version",
        CARGO_DEB_VERSION,
        "--locked",
    ]))
}

/// mcr(8) and a page per command (mcr-run(8), …), from the CLI's definition: the options and
/// their defaults can never disagree with the binary.
pub fn write_man_pages(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    fs::create_dir_all(dir)?;
    let mut command = mcr::cli::Cli::command().disable_help_subcommand(true);
    // Gives the commands their page names (`mcr-run`).
    command.build();
    let mut pages = Vec::new();
    for page in std::iter::once(command.clone()).chain(
        command
            .get_subcommands()
            .filter(|sub| !sub.is_hide_set())
            .cloned(),
    ) {
        let man = clap_mangen::Man::new(page)
            .section("8")
            .source(format!("mcr {}", env!("CARGO_PKG_VERSION")))
            .manual("System Administration");
        let path = man
            .generate_to(dir)
            .with_context(|| format!("writing a man page in {}", dir.display()))?;
        pages.push(path);
    }
    Ok(pages)
}

/// Completions for bash, zsh and fish, named as each shell's vendor directory expects.
fn write_completions(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir)?;
    for (shell, name) in [
        (Shell::Bash, "mcr.bash"),
        (Shell::Zsh, "_mcr"),
        (Shell::Fish, "mcr.fish"),
    ] {
        let mut file = fs::File::create(dir.join(name))
            .with_context(|| format!("creating {}", dir.join(name).display()))?;
        clap_complete::generate(shell, &mut mcr::cli::Cli::command(), "mcr", &mut file);
    }
    Ok(())
}

/// Installs `package`, checks it, and purges it whatever the outcome.
fn check_installed(package: &Path) -> anyhow::Result<()> {
    setup::debian_packages(&CHECK_TOOLS)?;
    if output(Command::new("dpkg-query").args(["-W", "-f=${Status}", "mcr"]))
        .is_some_and(|status| status.contains("installed"))
    {
        bail!(
            "a package mcr is already installed on this machine; the check installs and purges \
             its own: remove it first (dpkg --purge mcr)"
        );
    }
    if Path::new("/etc/mcr/rules.yaml").exists() {
        bail!(
            "/etc/mcr/rules.yaml exists and belongs to no package: the check would install its \
             own rules file over it; move it away first"
        );
    }
    run(Command::new("dpkg").arg("-i").arg(package))?;
    let checked = check_installation();
    let purged = run(Command::new("dpkg").args(["--purge", "mcr"]));
    checked?;
    purged?;
    println!("xtask: package installed, checked and purged");
    Ok(())
}

fn check_installation() -> anyhow::Result<()> {
    let files = output(Command::new("dpkg").args(["-L", "mcr"])).unwrap_or_default();
    let files: Vec<&str> = files.lines().collect();
    for expected in INSTALLED {
        ensure!(
            files.contains(&expected),
            "the package does not install {expected}: {files:?}"
        );
    }
    let unit = [
        "/lib/systemd/system/mcr.service",
        "/usr/lib/systemd/system/mcr.service",
    ]
    .into_iter()
    .find(|unit| files.contains(unit))
    .with_context(|| format!("the package installs no mcr.service: {files:?}"))?;
    let conffiles = output(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "mcr"]))
        .unwrap_or_default();
    ensure!(
        conffiles.contains("/etc/mcr/rules.yaml"),
        "/etc/mcr/rules.yaml is not a conffile: {conffiles:?}"
    );

    // The user the packaged rules run the workers as: a system user that cannot log in.
    let user = output(Command::new("getent").args(["passwd", "mcr"]))
        .context("the package did not create the user mcr")?;
    let fields: Vec<&str> = user.trim().split(':').collect();
    let uid: u32 = fields.get(2).context("no uid")?.parse()?;
    ensure!((1..1000).contains(&uid), "mcr is not a system user: {user}");
    ensure!(
        fields
            .get(6)
            .is_some_and(|shell| shell.ends_with("nologin")),
        "mcr can log in: {user}"
    );

    // `mcr check` without --config reads the shipped /etc/mcr/rules.yaml.
    let checked = Command::new("/usr/sbin/mcr").arg("check").output()?;
    ensure!(
        checked.status.success(),
        "mcr check refuses the shipped rules: {}",
        String::from_utf8_lossy(&checked.stderr)
    );
    println!(
        "xtask: mcr check: {}",
        String::from_utf8_lossy(&checked.stdout).trim()
    );

    for page in INSTALLED.iter().filter(|path| path.contains("/man/")) {
        let shown = Command::new("man")
            .args(["--warnings", "-l"])
            .arg(page)
            .env("MANWIDTH", "80")
            .output()?;
        let warnings = String::from_utf8_lossy(&shown.stderr);
        ensure!(
            shown.status.success() && warnings.trim().is_empty(),
            "man -l {page}: {warnings}"
        );
        ensure!(
            String::from_utf8_lossy(&shown.stdout).contains("NAME"),
            "man -l {page} shows no NAME section"
        );
    }

    // systemd-analyze also checks that the commands and the man pages the unit names exist.
    let verified = Command::new("systemd-analyze")
        .args(["verify", unit])
        .output()?;
    let complaints = String::from_utf8_lossy(&verified.stderr);
    ensure!(
        verified.status.success() && complaints.trim().is_empty(),
        "systemd-analyze verify {unit}: {complaints}"
    );
    println!("xtask: systemd-analyze verify {unit}: no complaints");

    let completion = Command::new("bash")
        .args([
            "-c",
            "source /usr/share/bash-completion/completions/mcr && complete -p mcr",
        ])
        .output()?;
    ensure!(
        completion.status.success(),
        "the bash completion does not load: {}",
        String::from_utf8_lossy(&completion.stderr)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packaged_rules_file_is_valid_and_runs_the_workers_as_mcr() {
        let text = fs::read_to_string(crate::workspace_root().join("packaging/rules.yaml"))
            .expect("packaging/rules.yaml");
        assert!(text.contains("\n  user: mcr\n"), "{text}");
        // The user exists only once the package is installed; everything else must pass here.
        let config = mcr::config::parse(&text.replace("user: mcr", "user: nobody"))
            .expect("the packaged rules file is valid");
        assert_eq!(config.settings.metrics_listen, None, "metrics are opt-in");
        assert_eq!(config.rules.len(), 1);
        // The example of the endpoint stays on localhost.
        assert!(text.contains("#   listen: 127.0.0.1:"), "{text}");
    }

    #[test]
    fn every_rules_file_key_of_the_readme_is_in_mcr_rules_5() {
        let root = crate::workspace_root();
        let readme = fs::read_to_string(root.join("README.md")).expect("README.md");
        let page = fs::read_to_string(root.join("packaging/mcr-rules.5")).expect("mcr-rules.5");
        let section = readme
            .split("## Rules file")
            .nth(1)
            .and_then(|rest| rest.split("```yaml").nth(1))
            .and_then(|rest| rest.split("```").next())
            .expect("the README's rules-file example");
        let keys: Vec<&str> = section
            .lines()
            .filter_map(|line| {
                let line = line.trim_start().trim_start_matches("- ");
                let key = line.split(':').next()?;
                (line.contains(':')
                    && !key.is_empty()
                    && key.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
                .then_some(key)
            })
            .collect();
        assert!(keys.len() > 15, "{keys:?}");
        for key in keys {
            assert!(
                page.contains(&format!("{key}:")),
                "mcr-rules(5) does not describe `{key}`"
            );
        }
    }

    #[test]
    fn man_pages_cover_every_command_and_option() {
        let dir = std::env::temp_dir().join(format!("mcr-man-{}", std::process::id()));
        let pages = write_man_pages(&dir).expect("pages written");
        let names: Vec<String> = pages
            .iter()
            .filter_map(|page| Some(page.file_name()?.to_string_lossy().into_owned()))
            .collect();
        for expected in [
            "mcr.8",
            "mcr-run.8",
            "mcr-check.8",
            "mcr-stats.8",
            "mcr-status.8",
            "mcr-reload.8",
        ] {
            assert!(names.iter().any(|name| name == expected), "{names:?}");
        }
        assert!(
            !names.iter().any(|name| name.contains("worker")),
            "the internal worker command has a page: {names:?}"
        );
        let run = fs::read_to_string(dir.join("mcr-run.8")).expect("mcr-run.8");
        for option in ["metrics\\-listen", "/etc/mcr/rules.yaml", "pin\\-dir"] {
            assert!(run.contains(option), "mcr-run(8) lacks {option}:\n{run}");
        }
        let _ = fs::remove_dir_all(&dir);
        // INSTALLED lists the same pages.
        for name in &names {
            assert!(
                INSTALLED.contains(&format!("/usr/share/man/man8/{name}.gz").as_str()),
                "{name} is not checked after installation"
            );
        }
    }
}
