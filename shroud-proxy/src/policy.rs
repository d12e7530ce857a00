//! The `--authorized` policy: which client keys may publish which hostnames.
//!
//! The file holds one binding per line, `HOSTNAME KEY`, separated by whitespace. `#` starts a
//! comment, on a line of its own or after a binding; blank lines are ignored. `HOSTNAME` is
//! either a hostname or `*.` followed by one, which stands for every name below that one, at
//! any depth, but not for the name itself. `KEY` is a client key as `shroud-client` prints it
//! (`ed25519:` and 43 base64url characters). A hostname may be listed with several keys and a
//! key with several hostnames.
//!
//! ```text
//! # Alice runs the blog.
//! blog.example.com     ed25519:...
//! # Bob gets every name under dev.example.com, such as a.dev.example.com.
//! *.dev.example.com    ed25519:...
//! ```

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};

use shroud_mux::auth::PublicKey;
use shroud_mux::hostname;

/// Which keys may bind which hostnames, as read from an authorized file.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Keys allowed for exactly this hostname.
    exact: HashMap<String, HashSet<PublicKey>>,
    /// Keys allowed for every name strictly below this hostname (from `*.hostname`).
    below: HashMap<String, HashSet<PublicKey>>,
    /// The number of distinct bindings in both maps.
    bindings: usize,
}

/// Why an authorized file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A line is not a valid binding.
    #[error("line {line}: {reason}")]
    Line {
        /// The line's number, counting from 1.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The file could not be read.
    #[error("cannot read authorized file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        #[source]
        source: io::Error,
    },
}

impl Policy {
    /// Parses the text of an authorized file.
    pub fn parse(text: &str) -> Result<Policy, PolicyError> {
        let mut policy = Policy::default();
        for (index, line) in text.lines().enumerate() {
            let content = line.split_once('#').map_or(line, |(before, _)| before);
            let fields: Vec<&str> = content.split_whitespace().collect();
            let error = |reason: String| PolicyError::Line {
                line: index + 1,
                reason,
            };
            let (name, key) = match fields[..] {
                [] => continue,
                [name, key] => (name, key),
                _ => {
                    let plural = if fields.len() == 1 { "" } else { "s" };
                    return Err(error(format!(
                        "expected \"HOSTNAME KEY\", found {} field{plural}",
                        fields.len()
                    )));
                }
            };
            let (scope, name) = parse_name(name).map_err(error)?;
            let key: PublicKey = key
                .parse()
                .map_err(|err| error(format!("bad key for \"{name}\": {err}")))?;
            let map = match scope {
                Scope::Exact => &mut policy.exact,
                Scope::Below => &mut policy.below,
            };
            if map.entry(name).or_default().insert(key) {
                policy.bindings += 1;
            }
        }
        Ok(policy)
    }

    /// Reads and parses an authorized file.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Policy::parse(&text)
    }

    /// Whether `key` may bind `hostname`, which must already be normalised (see
    /// [`shroud_mux::hostname::normalize`]).
    ///
    /// Looks up the name itself, then each name above it for a wildcard entry: one hash lookup
    /// per label.
    pub fn allows(&self, hostname: &str, key: &PublicKey) -> bool {
        let holds = |map: &HashMap<String, HashSet<PublicKey>>, name: &str| {
            map.get(name).is_some_and(|keys| keys.contains(key))
        };
        if holds(&self.exact, hostname) {
            return true;
        }
        let mut rest = hostname;
        while let Some((_, parent)) = rest.split_once('.') {
            if holds(&self.below, parent) {
                return true;
            }
            rest = parent;
        }
        false
    }

    /// Whether any key at all may bind `hostname` (normalised, as for [`Policy::allows`]).
    pub fn covers(&self, hostname: &str) -> bool {
        if self.exact.contains_key(hostname) {
            return true;
        }
        let mut rest = hostname;
        while let Some((_, parent)) = rest.split_once('.') {
            if self.below.contains_key(parent) {
                return true;
            }
            rest = parent;
        }
        false
    }

    /// The number of distinct bindings (hostname or wildcard, and key).
    pub fn len(&self) -> usize {
        self.bindings
    }

    /// How many bindings this policy has that `old` has not, and how many `old` has that this
    /// one has not: what a reload from `old` to this policy adds and removes.
    pub fn changes_from(&self, old: &Policy) -> (usize, usize) {
        (missing_from(self, old), missing_from(old, self))
    }

    /// Whether the policy allows nothing at all.
    pub fn is_empty(&self) -> bool {
        self.bindings == 0
    }
}

/// How many bindings of `policy` `other` lacks.
fn missing_from(policy: &Policy, other: &Policy) -> usize {
    let missing = |mine: &HashMap<String, HashSet<PublicKey>>,
                   theirs: &HashMap<String, HashSet<PublicKey>>| {
        mine.iter()
            .map(|(name, keys)| match theirs.get(name) {
                Some(their_keys) => keys.difference(their_keys).count(),
                None => keys.len(),
            })
            .sum::<usize>()
    };
    missing(&policy.exact, &other.exact) + missing(&policy.below, &other.below)
}

/// Whether an entry names one hostname or everything below one.
enum Scope {
    Exact,
    Below,
}

/// Parses the `HOSTNAME` field of a binding.
fn parse_name(field: &str) -> Result<(Scope, String), String> {
    let (scope, name) = match field.strip_prefix("*.") {
        Some(parent) => (Scope::Below, parent),
        None if field == "*" => {
            return Err(
                "a wildcard is \"*.\" followed by a hostname, as in \"*.example.com\"".into(),
            )
        }
        None => (Scope::Exact, field),
    };
    let normalized =
        hostname::normalize(name).map_err(|err| format!("invalid hostname \"{field}\": {err}"))?;
    Ok((scope, normalized))
}

#[cfg(test)]
mod tests {
    use super::*;

    use shroud_mux::auth::SecretKey;

    fn key(seed: u8) -> PublicKey {
        SecretKey::from_seed(&[seed; 32]).public()
    }

    fn line_error(text: &str) -> (usize, String) {
        match Policy::parse(text) {
            Err(PolicyError::Line { line, reason }) => (line, reason),
            other => panic!("expected a line error for {text:?}, got {other:?}"),
        }
    }

    #[test]
    fn parses_bindings_comments_and_blank_lines() {
        let (a, b) = (key(1), key(2));
        let text = format!(
            "# authorized clients\n\
             \n\
             Blog.Example.COM.\t{a}   # Alice\n\
             \x20  *.dev.example.com {b}\n\
             blog.example.com {b}\n\
             blog.example.com {a}\n\
             # the end, no newline\n\
             plain.test {a}"
        );
        let policy = Policy::parse(&text).unwrap();
        assert_eq!(policy.len(), 4);
        assert!(!policy.is_empty());
        assert!(policy.allows("blog.example.com", &a));
        assert!(policy.allows("blog.example.com", &b));
        assert!(policy.allows("plain.test", &a));
        assert!(!policy.allows("plain.test", &b));
        assert!(!policy.allows("other.example.com", &a));
    }

    #[test]
    fn wildcards_cover_every_depth_but_not_the_parent() {
        let (a, b) = (key(1), key(2));
        let policy = Policy::parse(&format!("*.example.com {a}\nexample.com {b}\n")).unwrap();
        assert!(policy.allows("x.example.com", &a));
        assert!(policy.allows("x.y.z.example.com", &a));
        assert!(!policy.allows("example.com", &a));
        assert!(policy.allows("example.com", &b));
        assert!(!policy.allows("x.example.com", &b));
        assert!(!policy.allows("xexample.com", &a));
        assert!(!policy.allows("example.com.evil.test", &a));
        assert!(!policy.allows("com", &a));
    }

    #[test]
    fn covers_names_any_key_may_bind() {
        let policy = Policy::parse(&format!("a.test {}\n*.b.test {}\n", key(1), key(2))).unwrap();
        assert!(policy.covers("a.test"));
        assert!(policy.covers("x.b.test"));
        assert!(policy.covers("y.x.b.test"));
        assert!(!policy.covers("b.test"));
        assert!(!policy.covers("x.a.test"));
        assert!(!policy.covers("c.test"));
    }

    #[test]
    fn exact_and_wildcard_entries_are_independent() {
        let (a, b) = (key(1), key(2));
        let policy = Policy::parse(&format!("a.example.com {b}\n*.a.example.com {a}")).unwrap();
        assert!(policy.allows("a.example.com", &b));
        assert!(!policy.allows("a.example.com", &a));
        assert!(policy.allows("b.a.example.com", &a));
        assert!(!policy.allows("b.a.example.com", &b));
    }

    #[test]
    fn duplicates_count_once_and_empty_text_is_empty() {
        let a = key(1);
        let policy = Policy::parse(&format!("x.test {a}\nX.TEST {a}\n*.x.test {a}\n")).unwrap();
        assert_eq!(policy.len(), 2);
        for text in ["", "\n\n", "# nothing\n   # still nothing\n\t\n"] {
            let policy = Policy::parse(text).unwrap();
            assert!(policy.is_empty());
            assert_eq!(policy.len(), 0);
            assert!(!policy.allows("x.test", &a));
        }
    }

    #[test]
    fn changes_count_bindings_added_and_removed() {
        let (a, b) = (key(1), key(2));
        let old = Policy::parse(&format!("x.test {a}\ny.test {a}\n*.z.test {b}\n")).unwrap();
        let new = Policy::parse(&format!(
            "x.test {a}\nx.test {b}\n*.z.test {a}\nw.test {b}\n"
        ))
        .unwrap();
        // Added: x.test b, *.z.test a, w.test b. Removed: y.test a, *.z.test b.
        assert_eq!(new.changes_from(&old), (3, 2));
        assert_eq!(old.changes_from(&new), (2, 3));
        assert_eq!(old.changes_from(&old), (0, 0));
        assert_eq!(Policy::default().changes_from(&old), (0, 3));
    }

    #[test]
    fn crlf_line_endings_are_accepted() {
        let a = key(1);
        let policy = Policy::parse(&format!("# hi\r\nx.test {a}\r\n")).unwrap();
        assert!(policy.allows("x.test", &a));
    }

    #[test]
    fn wrong_field_counts_are_refused() {
        let a = key(1);
        let (line, reason) = line_error(&format!("# c\nx.test {a}\nx.test {a} extra\n"));
        assert_eq!(line, 3);
        assert_eq!(reason, "expected \"HOSTNAME KEY\", found 3 fields");
        let (line, reason) = line_error("\nx.test\n");
        assert_eq!(line, 2);
        assert_eq!(reason, "expected \"HOSTNAME KEY\", found 1 field");
        let err = Policy::parse(&format!("x.test {a} {a}")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "line 1: expected \"HOSTNAME KEY\", found 3 fields"
        );
    }

    #[test]
    fn bad_hostnames_are_refused() {
        let a = key(1);
        for name in [
            "*",
            "*.",
            "*.*.example.com",
            "a.*.b",
            "*example.com",
            "a..b",
            "-a.test",
            "é.test",
            "**.x",
        ] {
            let (line, reason) = line_error(&format!("{name} {a}"));
            assert_eq!(line, 1);
            assert!(!reason.is_empty(), "{name}");
        }
        let (_, reason) = line_error(&format!("* {a}"));
        assert!(reason.contains("*.example.com"), "{reason}");
        let (_, reason) = line_error(&format!("a.*.b {a}"));
        assert!(
            reason.starts_with("invalid hostname \"a.*.b\": "),
            "{reason}"
        );
    }

    #[test]
    fn bad_keys_are_refused_with_the_key_error() {
        let (_, reason) = line_error("x.test ssh-ed25519:AAAA");
        assert_eq!(
            reason,
            format!(
                "bad key for \"x.test\": {}",
                shroud_mux::auth::KeyParseError::MissingPrefix
            )
        );
        let (_, reason) = line_error("x.test ed25519:short");
        assert!(reason.contains("43 base64url characters"), "{reason}");
        // The key and the hostname swapped.
        let a = key(1);
        let (_, reason) = line_error(&format!("{a} x.test"));
        assert!(
            reason.starts_with("invalid hostname \"ed25519:"),
            "{reason}"
        );
    }

    #[test]
    fn a_comment_glued_to_a_key_ends_it() {
        let a = key(1);
        let policy = Policy::parse(&format!("x.test {a}#note")).unwrap();
        assert!(policy.allows("x.test", &a));
    }

    #[test]
    fn load_reads_a_file_and_names_it_on_failure() {
        let dir = std::env::temp_dir().join(format!("shroud-policy-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("authorized");
        let a = key(1);
        std::fs::write(&path, format!("x.test {a}\n")).unwrap();
        let policy = Policy::load(&path).unwrap();
        assert!(policy.allows("x.test", &a));
        std::fs::remove_file(&path).unwrap();

        let err = Policy::load(&path).unwrap_err();
        assert!(matches!(err, PolicyError::Read { .. }));
        assert!(err.to_string().contains(&path.display().to_string()));
        std::fs::remove_dir(&dir).unwrap();
    }
}
