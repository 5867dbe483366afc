//! Which forwarding path the end-to-end suites exercise. `cargo xtask integration` runs the
//! forwarding, reload and IPv6 suites once with `MCR_TEST_PATH=worker` and once with
//! `MCR_TEST_PATH=kernel`: every rules file a test writes then pins `settings.path`, and
//! [`crate::Mcr::start`] waits until every active rule really runs on that path, so a suite
//! labelled kernel can never pass on the workers. Unset, rules take MCR's default (`auto`).

/// A line that marks a rules file whose path the environment chose.
const MARKER: &str = "# settings.path from MCR_TEST_PATH";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestPath {
    /// MCR's default: the kernel path where it can, the workers otherwise.
    Default,
    Kernel,
    Worker,
}

impl TestPath {
    /// The path `MCR_TEST_PATH` names.
    pub fn from_env() -> Self {
        match std::env::var("MCR_TEST_PATH").as_deref() {
            Ok("kernel") => Self::Kernel,
            Ok("worker") => Self::Worker,
            _ => Self::Default,
        }
    }

    /// The `path` value MCR reports for active rules, when the environment chose one.
    pub fn name(self) -> Option<&'static str> {
        match self {
            Self::Default => None,
            Self::Kernel => Some("kernel"),
            Self::Worker => Some("worker"),
        }
    }
}

/// `text` with `settings.path` set to the environment's path. A file that chooses paths
/// itself (it mentions `path:`) is left as it is.
pub fn with_test_path(text: &str) -> String {
    let Some(path) = TestPath::from_env().name() else {
        return text.to_owned();
    };
    if text.contains("path:") {
        return text.to_owned();
    }
    // Where the file has no settings, they go at its end, so that the line numbers of its
    // own text (which tests of error messages expect) stay as they are.
    let setting = format!("  path: {path}  {MARKER}\n");
    match text.find("settings:\n") {
        Some(at) => {
            let after = at + "settings:\n".len();
            format!("{}{setting}{}", &text[..after], &text[after..])
        }
        None if text.ends_with('\n') => format!("{text}settings:\n{setting}"),
        None => format!("{text}\nsettings:\n{setting}"),
    }
}

/// The path the rules file at `text` was pinned to by [`with_test_path`], if any.
pub fn pinned_path(text: &str) -> Option<&'static str> {
    if text.contains(MARKER) {
        TestPath::from_env().name()
    } else {
        None
    }
}
