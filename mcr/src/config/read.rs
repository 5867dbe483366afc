//! Reading the rules file so that no path can hang the reader or exhaust its memory: only a
//! regular file (after symlinks) is read, at most [`MAX_FILE_SIZE`] bytes of it, and its text
//! must be UTF-8.
//!
//! The supervisor reads this file on every reload, so a FIFO without a writer, `/dev/zero` or a
//! file that keeps growing must end in an error, not in a wait or an allocation without end.

use std::{
    fs::{File, Metadata, OpenOptions},
    io::{self, Read as _},
    os::unix::fs::{FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::Path,
};

use nix::libc;

use super::{ConfigError, MAX_FILE_SIZE, Problem};

/// The text of the rules file at `path`.
pub fn read_text(path: &Path) -> Result<String, ConfigError> {
    let bytes = read_bytes(path)?;
    String::from_utf8(bytes).map_err(|error| ConfigError::Invalid {
        path: path.to_owned(),
        problems: vec![not_utf8(error.as_bytes(), error.utf8_error().valid_up_to())],
    })
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, ConfigError> {
    let read_error = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    // An `O_PATH` descriptor names the file without opening it: no device driver's open runs
    // (opening some devices has effects of its own) and a FIFO does not wait for a writer.
    let named = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(path)
        .map_err(read_error)?;
    let metadata = named.metadata().map_err(read_error)?;
    check_regular(path, &metadata)?;
    let file = reopen(&named, path).map_err(read_error)?;
    // The file opened is the one checked above: same device and inode, still a regular file.
    let opened = file.metadata().map_err(read_error)?;
    check_regular(path, &opened)?;
    if (opened.dev(), opened.ino()) != (metadata.dev(), metadata.ino()) {
        return Err(read_error(io::Error::other(
            "the file was replaced while it was being opened",
        )));
    }
    if opened.len() > MAX_FILE_SIZE {
        return Err(ConfigError::TooLarge {
            path: path.to_owned(),
            size: opened.len(),
        });
    }
    // One byte more than the limit tells a file that grew past it while being read.
    let mut bytes = Vec::new();
    file.take(MAX_FILE_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    let size = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    if size > MAX_FILE_SIZE {
        return Err(ConfigError::TooLarge {
            path: path.to_owned(),
            size,
        });
    }
    Ok(bytes)
}

/// Opens for reading the file `named` refers to. Through `/proc/self/fd` this is the very
/// inode checked, with no window for the path to change; without `/proc` the path is opened
/// again and the caller compares inodes. `O_NONBLOCK` keeps even that fallback from waiting on
/// a FIFO swapped in meanwhile.
fn reopen(named: &File, path: &Path) -> io::Result<File> {
    use std::os::fd::AsRawFd as _;
    let mut options = OpenOptions::new();
    options
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    match options.open(format!("/proc/self/fd/{}", named.as_raw_fd())) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => options.open(path),
        result => result,
    }
}

fn check_regular(path: &Path, metadata: &Metadata) -> Result<(), ConfigError> {
    let kind = metadata.file_type();
    let what = if kind.is_file() {
        return Ok(());
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO (named pipe)"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a file"
    };
    Err(ConfigError::NotRegularFile {
        path: path.to_owned(),
        kind: what,
    })
}

/// The problem of a text that stops being UTF-8 at byte `offset`.
fn not_utf8(bytes: &[u8], offset: usize) -> Problem {
    let before = &bytes[..offset];
    let line = before.split(|&byte| byte == b'\n').count();
    let line_start = before
        .iter()
        .rposition(|&byte| byte == b'\n')
        .map_or(0, |newline| newline + 1);
    Problem {
        line: Some(line),
        field: String::new(),
        message: format!(
            "not UTF-8: byte 0x{:02x} at byte offset {offset} (byte {} of the line) does not \
             begin a valid UTF-8 character; save the file as UTF-8",
            bytes[offset],
            offset - line_start + 1,
        ),
    }
}
