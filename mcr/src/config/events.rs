//! The YAML events of a text one at a time, from libyaml (unsafe-libyaml), the parser that
//! `serde_yaml` runs on the same text.
//!
//! `serde_yaml` collects every event of a document before it looks at any of them, so it offers
//! no way to stop early. The checks that must run before it (`shape.rs`) and the line index
//! (`lines.rs`) read events here instead: one at a time, in the memory of one event, and from
//! the very parser whose cost they bound. libyaml scans at most about 1 KiB of tokens past the
//! event it returns (it gives up on a possible mapping key after 1,024 characters), so stopping
//! at an event stops the work.
//!
//! This is the one place outside the kernel boundary where MCR calls unsafe code: the parser is
//! a C library translated to Rust and takes raw pointers. Every call is below, each with why it
//! is sound.

use std::{ffi::CStr, marker::PhantomData, mem::MaybeUninit, ptr::NonNull};

/// An anchor's name, as the file spells it.
pub type Anchor = Box<[u8]>;

#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    Scalar {
        value: String,
        anchor: Option<Anchor>,
    },
    SequenceStart {
        anchor: Option<Anchor>,
    },
    MappingStart {
        anchor: Option<Anchor>,
    },
    SequenceEnd,
    MappingEnd,
    Alias {
        anchor: Anchor,
    },
    /// The start or end of the stream or of a document.
    Boundary,
}

/// Text that is not YAML, where the parser gave up.
#[derive(Debug, PartialEq, Eq)]
pub struct SyntaxError {
    pub line: usize,
    pub message: String,
}

/// The events of one text, each with the line it starts on.
pub struct Events<'text> {
    /// `None` when libyaml could not allocate its buffers.
    parser: Option<Box<unsafe_libyaml::yaml_parser_t>>,
    /// The parser holds a pointer into the text.
    text: PhantomData<&'text str>,
    /// Set after the end of the stream or an error: libyaml must not be called again.
    finished: bool,
}

impl<'text> Events<'text> {
    pub fn new(text: &'text str) -> Self {
        let mut parser = Box::<unsafe_libyaml::yaml_parser_t>::new_uninit();
        // SAFETY: `yaml_parser_initialize` writes every field of the parser it is given (it
        // zeroes the struct first) and reports whether it could allocate its buffers; only an
        // initialized parser is kept.
        let parser = unsafe {
            if unsafe_libyaml::yaml_parser_initialize(parser.as_mut_ptr()).fail {
                None
            } else {
                Some(parser.assume_init())
            }
        };
        let mut events = Self {
            parser,
            text: PhantomData,
            finished: false,
        };
        if let Some(parser) = events.parser.as_deref_mut() {
            let length = u64::try_from(text.len()).expect("a text's length fits 64 bits");
            // SAFETY: the parser is initialized and has no input yet; it keeps the pointer to
            // `text`, which outlives it (`'text`) and is never written.
            unsafe {
                unsafe_libyaml::yaml_parser_set_encoding(
                    parser,
                    unsafe_libyaml::YAML_UTF8_ENCODING,
                );
                unsafe_libyaml::yaml_parser_set_input_string(parser, text.as_ptr(), length);
            }
        }
        events
    }
}

impl Iterator for Events<'_> {
    type Item = Result<(Event, usize), SyntaxError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished {
            return None;
        }
        let Some(parser) = self.parser.as_deref_mut() else {
            self.finished = true;
            return Some(Err(SyntaxError {
                line: 1,
                message: "out of memory".to_owned(),
            }));
        };
        let mut slot = MaybeUninit::<unsafe_libyaml::yaml_event_t>::uninit();
        // SAFETY: the parser is initialized, has its input, and has not failed before (after
        // a failure `finished` is set); `yaml_parser_parse` writes the event whether or not it
        // succeeds.
        if unsafe { unsafe_libyaml::yaml_parser_parse(parser, slot.as_mut_ptr()) }.fail {
            self.finished = true;
            return Some(Err(syntax_error(parser)));
        }
        // SAFETY: `yaml_parser_parse` succeeded, so it filled in the event.
        let mut produced = unsafe { slot.assume_init() };
        // SAFETY: the event is one libyaml just produced, read before it is deleted.
        let event = unsafe { convert(&produced) };
        let line = line_of(produced.start_mark);
        let end = produced.type_ == unsafe_libyaml::YAML_STREAM_END_EVENT;
        // SAFETY: the event is deleted exactly once, and nothing read from it is kept: its
        // strings were copied by `convert`.
        unsafe { unsafe_libyaml::yaml_event_delete(&raw mut produced) };
        if end {
            self.finished = true;
        }
        Some(Ok((event, line)))
    }
}

impl Drop for Events<'_> {
    fn drop(&mut self) {
        if let Some(parser) = self.parser.as_deref_mut() {
            // SAFETY: the parser was initialized and is deleted once, here.
            unsafe { unsafe_libyaml::yaml_parser_delete(parser) };
        }
    }
}

/// Copies what MCR needs out of an event.
///
/// # Safety
///
/// `raw` is an event produced by `yaml_parser_parse` and not yet deleted: its type says which
/// member of `data` is set, and its pointers are null or valid.
unsafe fn convert(raw: &unsafe_libyaml::yaml_event_t) -> Event {
    match raw.type_ {
        unsafe_libyaml::YAML_SCALAR_EVENT => {
            // SAFETY: a scalar event's data is its `scalar` member.
            let scalar = unsafe { raw.data.scalar };
            let length = usize::try_from(scalar.length).expect("a scalar fits in memory");
            let value = match NonNull::new(scalar.value) {
                // SAFETY: libyaml's scalar value is `length` bytes long.
                Some(value) if length > 0 => String::from_utf8_lossy(unsafe {
                    std::slice::from_raw_parts(value.as_ptr(), length)
                })
                .into_owned(),
                _ => String::new(),
            };
            Event::Scalar {
                value,
                // SAFETY: an event's anchor is null or a string the event owns.
                anchor: unsafe { anchor(scalar.anchor) },
            }
        }
        unsafe_libyaml::YAML_SEQUENCE_START_EVENT => Event::SequenceStart {
            // SAFETY: the `sequence_start` member is set; its anchor is null or owned by it.
            anchor: unsafe { anchor(raw.data.sequence_start.anchor) },
        },
        unsafe_libyaml::YAML_MAPPING_START_EVENT => Event::MappingStart {
            // SAFETY: the `mapping_start` member is set; its anchor is null or owned by it.
            anchor: unsafe { anchor(raw.data.mapping_start.anchor) },
        },
        unsafe_libyaml::YAML_SEQUENCE_END_EVENT => Event::SequenceEnd,
        unsafe_libyaml::YAML_MAPPING_END_EVENT => Event::MappingEnd,
        unsafe_libyaml::YAML_ALIAS_EVENT => Event::Alias {
            // SAFETY: the `alias` member is set; an alias always names its anchor.
            anchor: unsafe { anchor(raw.data.alias.anchor) }.unwrap_or_default(),
        },
        _ => Event::Boundary,
    }
}

/// A copy of an anchor's name.
///
/// # Safety
///
/// `name` is null or a NUL-terminated string that stays valid for this call.
unsafe fn anchor(name: *mut u8) -> Option<Anchor> {
    let name = NonNull::new(name)?;
    // SAFETY: as the caller promises.
    let name = unsafe { CStr::from_ptr(name.as_ptr().cast()) };
    Some(name.to_bytes().into())
}

/// What libyaml says about the failure it just reported.
fn syntax_error(parser: &unsafe_libyaml::yaml_parser_t) -> SyntaxError {
    let text = |message: *const std::ffi::c_char| {
        NonNull::new(message.cast_mut()).map(|message| {
            // SAFETY: libyaml's `problem` and `context` are null or static NUL-terminated
            // strings.
            unsafe { CStr::from_ptr(message.as_ptr()) }.to_string_lossy()
        })
    };
    let problem = text(parser.problem).unwrap_or_else(|| "out of memory".into());
    let message = match text(parser.context) {
        Some(context) => format!(
            "{problem} ({context} on line {})",
            line_of(parser.context_mark)
        ),
        None => problem.into_owned(),
    };
    SyntaxError {
        line: line_of(parser.problem_mark),
        message,
    }
}

/// libyaml counts lines from 0.
fn line_of(mark: unsafe_libyaml::yaml_mark_t) -> usize {
    usize::try_from(mark.line).map_or(usize::MAX, |line| line + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_come_with_their_lines_and_anchors() {
        let events: Vec<(Event, usize)> = Events::new("a: &x [1]\nb: *x\n")
            .collect::<Result<_, _>>()
            .expect("valid YAML");
        let scalar = |value: &str| Event::Scalar {
            value: value.to_owned(),
            anchor: None,
        };
        assert_eq!(
            events,
            [
                (Event::Boundary, 1),
                (Event::Boundary, 1),
                (Event::MappingStart { anchor: None }, 1),
                (scalar("a"), 1),
                (
                    Event::SequenceStart {
                        anchor: Some(b"x"[..].into())
                    },
                    1
                ),
                (scalar("1"), 1),
                (Event::SequenceEnd, 1),
                (scalar("b"), 2),
                (
                    Event::Alias {
                        anchor: b"x"[..].into()
                    },
                    2
                ),
                (Event::MappingEnd, 3),
                (Event::Boundary, 3),
                (Event::Boundary, 3),
            ]
        );
    }

    #[test]
    fn a_syntax_error_ends_the_events() {
        let mut events = Events::new("a: [1,\nb: 2\n");
        let error = events.by_ref().find_map(Result::err).expect("an error");
        // The sequence is still open when the text ends, on line 3.
        assert_eq!(error.line, 3);
        assert!(
            error
                .message
                .contains("while parsing a flow sequence on line 1"),
            "{error:?}"
        );
        assert!(events.next().is_none());
    }
}
