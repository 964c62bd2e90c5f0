//! Real English text without downloads: sentences from the docstrings of the Python standard
//! library, which every machine that runs mixq has (mixq's venv is built on it).
//!
//! A text model needs calibration and evaluation sentences, and the project may not ship other
//! people's text. The standard library's docstrings are plain technical English, written by many
//! authors. [`StdlibCorpus::build`] walks the library's `.py` files in sorted order (leaving out
//! the test suite, `site-packages` and generated codec tables), extracts module, class and
//! function docstrings with a small Python tokenizer ([`docstrings`]: strings, comments, brackets
//! and `def`/`class` headers, nothing more), cleans them as `inspect.cleandoc` does, drops
//! doctest and indented code paragraphs, splits the rest into sentences ([`sentences`]), keeps
//! those that read as prose, removes duplicates, and shuffles them with a fixed seed. The
//! calibration and test splits are the two halves of the shuffled list, so they are disjoint.
//!
//! The text therefore depends on the Python version of the machine (3.11 here); every report
//! that uses it is keyed by a hash of the token ids, not of the spec.

use crate::error::{Error, Result};
use crate::util::SplitMix64;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// The fewest sentences a corpus must have (calibration and test splits together).
pub const MIN_SENTENCES: usize = 2000;

/// Seed of the shuffle that orders the sentences (and so decides the splits).
pub const SHUFFLE_SEED: u64 = 0x5354_444c_4942; // "STDLIB"

/// Directory names under the standard library whose files are not read: the test suite (code
/// more than prose), installed packages, generated codec tables, byte-code caches.
const SKIPPED_DIRS: [&str; 8] = ["test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings", "lib2to3"];

/// Sentences of the standard library's docstrings, deduplicated and shuffled.
#[derive(Debug, Clone)]
pub struct StdlibCorpus {
    /// The standard library directory read.
    pub root: PathBuf,
    /// Number of `.py` files read.
    pub files: usize,
    /// The sentences, in shuffled order.
    pub sentences: Vec<String>,
}

/// The splits of the corpus: `calib` is the first half of the shuffled sentences, `test` the
/// second, `all` both.
pub const SPLITS: [&str; 3] = ["calib", "test", "all"];

impl StdlibCorpus {
    /// Builds the corpus from the standard library found by [`stdlib_dir`].
    pub fn load() -> Result<StdlibCorpus> {
        StdlibCorpus::build(&stdlib_dir()?)
    }

    /// Builds the corpus from the `.py` files under `root`; fewer than [`MIN_SENTENCES`]
    /// sentences is an error.
    pub fn build(root: &Path) -> Result<StdlibCorpus> {
        let mut files = Vec::new();
        collect_py(root, &mut files)?;
        files.sort();
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        let mut read = 0usize;
        for f in &files {
            // Files that are not UTF-8 (a few test data files in some versions) are skipped.
            let Ok(text) = std::fs::read_to_string(f) else { continue };
            read += 1;
            for doc in docstrings(&text) {
                for s in sentences(&doc) {
                    if seen.insert(s.clone()) {
                        out.push(s);
                    }
                }
            }
        }
        if out.len() < MIN_SENTENCES {
            return Err(Error::Data {
                source_name: root.display().to_string(),
                msg: format!(
                    "the docstrings of {read} Python files give {} sentences; the text corpus needs at least {MIN_SENTENCES} (is this a complete Python standard library?)",
                    out.len()
                ),
            });
        }
        SplitMix64(SHUFFLE_SEED).shuffle(&mut out);
        Ok(StdlibCorpus { root: root.to_path_buf(), files: read, sentences: out })
    }

    /// The sentences of `split` (`calib`, `test` or `all`).
    pub fn split(&self, split: &str) -> Result<&[String]> {
        let half = self.sentences.len() / 2;
        match split {
            "calib" => Ok(&self.sentences[..half]),
            "test" => Ok(&self.sentences[half..]),
            "all" => Ok(&self.sentences),
            _ => Err(Error::invalid("text split", split, format!("valid splits: {}", SPLITS.join(", ")))),
        }
    }
}

fn collect_py(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for e in entries {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            if !SKIPPED_DIRS.contains(&name.as_str()) && !name.starts_with('.') {
                collect_py(&path, out)?;
            }
        } else if ft.is_file() && name.ends_with(".py") {
            out.push(path);
        }
    }
    Ok(())
}

/// The Python standard library directory: `$MIXQ_STDLIB_DIR` when set, else what the Python of
/// mixq's venv ([`crate::model::zoo::venv_dir`]) reports as `sysconfig.get_path("stdlib")`, else
/// that of `python3` on the `PATH`.
pub fn stdlib_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("MIXQ_STDLIB_DIR").filter(|d| !d.is_empty()) {
        let d = PathBuf::from(d);
        return if d.is_dir() {
            Ok(d)
        } else {
            Err(Error::Data { source_name: d.display().to_string(), msg: "MIXQ_STDLIB_DIR is not a directory".into() })
        };
    }
    let venv_python = crate::model::zoo::venv_dir().join("bin").join("python");
    let mut tried = Vec::new();
    for python in [venv_python, PathBuf::from("python3")] {
        let out = std::process::Command::new(&python)
            .args(["-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"])
            .stdin(std::process::Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => {
                let d = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
                if d.is_dir() {
                    return Ok(d);
                }
                tried.push(format!("{} reported {}, which is not a directory", python.display(), d.display()));
            }
            Ok(o) => tried.push(format!("{} failed: {}", python.display(), String::from_utf8_lossy(&o.stderr).trim())),
            Err(e) => tried.push(format!("{}: {e}", python.display())),
        }
    }
    Err(Error::Data {
        source_name: "the Python standard library".into(),
        msg: format!("not found ({}); set MIXQ_STDLIB_DIR to its directory", tried.join("; ")),
    })
}

/// The docstrings of a Python source file: the contents of triple-quoted plain or raw strings
/// (no f- or b-strings) that are the first statement of the module or of a `def`/`class` body.
pub fn docstrings(src: &str) -> Vec<String> {
    let b = src.as_bytes();
    let n = b.len();
    let mut out = Vec::new();
    let mut i = 0;
    // A string here would be a docstring: at the start of the module, or after a header's colon.
    let mut expect_doc = true;
    // Inside a def/class header (before its colon at bracket depth 0).
    let mut header = false;
    let mut depth = 0i32;
    // At the first token of a logical line.
    let mut line_start = true;
    while i < n {
        let c = b[i];
        match c {
            b'\n' => {
                if depth == 0 {
                    line_start = true;
                }
                i += 1;
            }
            b' ' | b'\t' | b'\r' | b'\x0c' => i += 1,
            b'\\' => i += 2, // a line continuation
            b'#' => {
                while i < n && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'\'' | b'"' => {
                let (body, end) = string_literal(b, i);
                if expect_doc && depth == 0 {
                    if let Some(body) = body {
                        out.push(body);
                    }
                }
                expect_doc = false;
                line_start = false;
                i = end;
            }
            _ if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                let start = i;
                while i < n && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] >= 0x80) {
                    i += 1;
                }
                let word = &src[start..i];
                if i < n && (b[i] == b'\'' || b[i] == b'"') && word.len() <= 2 && word.chars().all(|ch| "rRuUbBfF".contains(ch)) {
                    // A prefixed string: a docstring only with r/u prefixes.
                    let (body, end) = string_literal(b, i);
                    let plain = !word.chars().any(|ch| "bBfF".contains(ch));
                    if expect_doc && depth == 0 && plain {
                        if let Some(body) = body {
                            out.push(body);
                        }
                    }
                    i = end;
                } else if line_start && matches!(word, "def" | "class" | "async") {
                    header = true;
                }
                expect_doc = false;
                line_start = false;
            }
            b'(' | b'[' | b'{' => {
                depth += 1;
                expect_doc = false;
                line_start = false;
                i += 1;
            }
            b')' | b']' | b'}' => {
                depth = (depth - 1).max(0);
                i += 1;
            }
            b':' if header && depth == 0 => {
                header = false;
                expect_doc = true;
                line_start = true;
                i += 1;
            }
            _ => {
                expect_doc = false;
                line_start = false;
                i += 1;
            }
        }
    }
    out
}

/// The string literal whose opening quote is at `b[start]`: its body when it is triple-quoted
/// (None for a one-quote string), and the index after its closing quote.
fn string_literal(b: &[u8], start: usize) -> (Option<String>, usize) {
    let q = b[start];
    let n = b.len();
    let triple = start + 2 < n && b[start + 1] == q && b[start + 2] == q;
    let mut i = if triple { start + 3 } else { start + 1 };
    let body_start = i;
    while i < n {
        if b[i] == b'\\' {
            i += 2;
            continue;
        }
        if triple {
            if i + 2 < n && b[i] == q && b[i + 1] == q && b[i + 2] == q {
                let body = String::from_utf8_lossy(&b[body_start..i]).into_owned();
                return (Some(body), i + 3);
            }
        } else if b[i] == q || b[i] == b'\n' {
            return (None, i + 1);
        }
        i += 1;
    }
    (None, n)
}

/// The prose sentences of one docstring: cleaned as `inspect.cleandoc` does (first line
/// stripped, the rest dedented), split into paragraphs at blank lines; paragraphs that hold
/// doctests or are indented under the docstring's margin (code, argument tables) are dropped;
/// each paragraph's lines are joined and split after `.`, `!` or `?` followed by a space and a
/// capital letter; a sentence is kept when it reads as prose ([`is_prose`]).
pub fn sentences(doc: &str) -> Vec<String> {
    let lines: Vec<&str> = doc.lines().collect();
    let margin = lines.iter().skip(1).filter(|l| !l.trim().is_empty()).map(|l| l.len() - l.trim_start().len()).min().unwrap_or(0);
    let mut paragraphs: Vec<Vec<&str>> = vec![Vec::new()];
    for (k, l) in lines.iter().enumerate() {
        if l.trim().is_empty() {
            paragraphs.push(Vec::new());
            continue;
        }
        let indent = if k == 0 { 0 } else { l.len() - l.trim_start().len() - margin.min(l.len() - l.trim_start().len()) };
        // Indented lines are code or tables; mark them so the paragraph is dropped.
        paragraphs.last_mut().expect("one paragraph at least").push(if indent > 0 { "\u{0}" } else { l.trim() });
    }
    let mut out = Vec::new();
    for p in paragraphs {
        if p.is_empty() || p.iter().any(|l| *l == "\u{0}" || l.starts_with(">>>") || l.starts_with("...")) {
            continue;
        }
        let text = p.join(" ");
        let text: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
        for s in split_sentences(&text) {
            if is_prose(s) {
                out.push(s.to_string());
            }
        }
    }
    out
}

/// Splits after `.`, `!` or `?` when a space and an uppercase letter follow.
fn split_sentences(text: &str) -> Vec<&str> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    for i in 0..b.len() {
        if matches!(b[i], b'.' | b'!' | b'?') && i + 2 < b.len() && b[i + 1] == b' ' && b[i + 2].is_ascii_uppercase() {
            out.push(&text[start..=i]);
            start = i + 2;
        }
    }
    out.push(&text[start..]);
    out
}

/// Whether `s` reads as an English sentence: 5 to 40 words and 24 to 240 characters, printable
/// ASCII, starting with a capital letter and ending with `.`, `!` or `?`, at least 85 % letters
/// and spaces, and none of the marks of code or markup (`>>>`, `://`, `==`, ` -- `, `{`, `}`,
/// `` ` ``, `_`).
pub fn is_prose(s: &str) -> bool {
    let words = s.split(' ').count();
    let letters = s.chars().filter(|c| c.is_ascii_alphabetic() || *c == ' ').count();
    (5..=40).contains(&words)
        && (24..=240).contains(&s.len())
        && s.chars().all(|c| c.is_ascii_graphic() || c == ' ')
        && s.starts_with(|c: char| c.is_ascii_uppercase())
        && s.ends_with(['.', '!', '?'])
        && letters * 100 >= s.len() * 85
        && !["|", ">>>", "://", "==", " -- ", "{", "}", "`", "_", "..."].iter().any(|m| s.contains(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = r#"#!/usr/bin/env python3
"""Module docstring. Too short."""
import os
x = """not a docstring: an assignment."""

def f(a: int = (1, 2),
      b=lambda y: y) -> dict[str, int]:
    r"""Return the thing that the caller asked for today.

    The second paragraph explains what happens when nothing is found.

        indented code block that must be dropped.
    >>> f(1)
    """
    s = "x"
    return f"""{s} is an f-string, never a docstring."""

class C(Base):
    '''A class docstring with single quotes inside it.'''
    def g(self): pass
"#;

    #[test]
    fn finds_module_function_and_class_docstrings_only() {
        let d = docstrings(SRC);
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d[0].starts_with("Module docstring"));
        assert!(d[1].starts_with("Return the thing"));
        assert!(d[2].starts_with("A class docstring"));
    }

    #[test]
    fn sentences_are_prose_only() {
        let d = docstrings(SRC);
        let s: Vec<String> = d.iter().flat_map(|d| sentences(d)).collect();
        assert_eq!(
            s,
            [
                "Return the thing that the caller asked for today.",
                "The second paragraph explains what happens when nothing is found.",
                "A class docstring with single quotes inside it."
            ],
            "the module docstring's sentences are too short, the code and the doctest dropped"
        );
        assert!(!is_prose("Return self.__dict__ as a mapping of names."));
        assert!(is_prose("Return a new list containing all items from the iterable."));
    }
}
