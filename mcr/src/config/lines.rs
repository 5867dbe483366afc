//! Where each field of a YAML document stands: maps a path such as `rules[2].input.group` to the
//! line it is written on, so semantic errors found after parsing can still name a line.
//!
//! `serde_yaml` reports positions only for the errors it raises itself; this index covers the
//! checks that look at several fields or rules at once. It reads the events of the parser
//! `serde_yaml` uses (`events.rs`), so both count lines alike.

use std::collections::HashMap;

use super::events::{Event, Events};

#[derive(Debug, Default)]
pub struct LineIndex {
    lines: HashMap<String, usize>,
}

impl LineIndex {
    /// Indexes `text`. A document the parser cannot read yields the index of what came before
    /// the error; `serde_yaml` reports that error with its own position.
    pub fn new(text: &str) -> Self {
        let mut builder = Builder::default();
        for (event, line) in Events::new(text).map_while(Result::ok) {
            builder.on_event(event, line);
        }
        Self {
            lines: builder.lines,
        }
    }

    /// The line of `path`, or of its nearest indexed parent (`rules[1].outputs[0].ttl` falls
    /// back to `rules[1].outputs[0]` when the field is absent).
    pub fn line_of(&self, path: &str) -> Option<usize> {
        let mut path = path;
        loop {
            if let Some(line) = self.lines.get(path) {
                return Some(*line);
            }
            path = &path[..path.rfind(['.', '['])?];
        }
    }
}

enum Frame {
    Mapping { path: String, key: Option<String> },
    Sequence { path: String, next: usize },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    lines: HashMap<String, usize>,
}

impl Builder {
    /// The path of the node that starts now, or `None` when the node is a mapping key.
    fn enter_node(&mut self) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Mapping { key: None, .. }) => None,
            Some(Frame::Mapping { path, key }) => {
                let key = key.take().unwrap_or_default();
                Some(if path.is_empty() {
                    key
                } else {
                    format!("{path}.{key}")
                })
            }
            Some(Frame::Sequence { path, next }) => {
                let item = format!("{path}[{next}]");
                *next += 1;
                Some(item)
            }
        }
    }

    fn on_event(&mut self, event: Event, line: usize) {
        match event {
            Event::Scalar { value, .. } => match self.enter_node() {
                Some(path) => {
                    self.lines.entry(path).or_insert(line);
                }
                None => {
                    if let Some(Frame::Mapping { path, key }) = self.stack.last_mut() {
                        let field = if path.is_empty() {
                            value.clone()
                        } else {
                            format!("{path}.{value}")
                        };
                        self.lines.insert(field, line);
                        *key = Some(value);
                    }
                }
            },
            Event::Alias { .. } => {
                if let Some(path) = self.enter_node() {
                    self.lines.entry(path).or_insert(line);
                }
            }
            Event::MappingStart { .. } | Event::SequenceStart { .. } => {
                let path = self.enter_node().unwrap_or_default();
                self.lines.entry(path.clone()).or_insert(line);
                self.stack
                    .push(if matches!(event, Event::MappingStart { .. }) {
                        Frame::Mapping { path, key: None }
                    } else {
                        Frame::Sequence { path, next: 0 }
                    });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            Event::Boundary => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_fields_items_and_parents() {
        let index = LineIndex::new(
            "settings:\n  workers: 2\nrules:\n  - name: a\n    input:\n      group: 239.1.1.1\n  - name: b\n",
        );
        assert_eq!(index.line_of("settings.workers"), Some(2));
        assert_eq!(index.line_of("rules[0].name"), Some(4));
        assert_eq!(index.line_of("rules[0].input.group"), Some(6));
        assert_eq!(index.line_of("rules[1].name"), Some(7));
        assert_eq!(index.line_of("rules[1].input.port"), Some(7));
    }
}
