//! Small helpers shared by several stages: atomic file writes, name suggestions, hashing.

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsync, rename.
/// An interrupted run never leaves a half-written file behind.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let file_name = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Parses `text` as a JSON object and checks its `"format"` and `"version"` header. Every
/// versioned file mixq reads (configs, sensitivity reports, cost tables) goes through here, so a
/// foreign file or an unknown version is rejected the same way everywhere. `what` names the kind
/// of file in messages (e.g. `mixq quant config`).
pub fn parse_versioned_json(text: &str, origin: &Path, format: &str, version: u64, what: &str) -> Result<serde_json::Value> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| Error::parse(origin, format!("not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(Error::parse(origin, format!("a {what} must be a JSON object")));
    }
    match value.get("format").and_then(|f| f.as_str()) {
        Some(f) if f == format => {}
        Some(other) => return Err(Error::parse(origin, format!("field `format` is `{other}`, expected `{format}`: this is not a {what}"))),
        None => return Err(Error::parse(origin, format!("missing field `format` (expected `\"format\": \"{format}\"`)"))),
    }
    match value.get("version").and_then(|v| v.as_u64()) {
        Some(v) if v == version => Ok(value),
        Some(got) => Err(Error::Version { path: origin.into(), what: format.into(), got, expected: version }),
        None => Err(Error::parse(origin, format!("missing or non-integer field `version` (expected {version})"))),
    }
}

/// Levenshtein edit distance between two strings (by chars).
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// The up to `n` names in `known` closest to `name` by edit distance (ties by name).
pub fn closest<'a>(name: &str, known: impl IntoIterator<Item = &'a str>, n: usize) -> Vec<String> {
    let mut scored: Vec<(usize, &str)> = known.into_iter().map(|k| (edit_distance(name, k), k)).collect();
    scored.sort();
    scored.into_iter().take(n).map(|(_, k)| k.to_string()).collect()
}

/// Hex SHA-256 of some bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(bytes);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny, well-mixed generator whose stream is fixed
/// forever, unlike libtorch's. mixq draws every random number it controls from it (weight
/// initialisation, shuffles, probes, synthetic instances), so results do not depend on the
/// platform, on thread interleaving, or on anything else that used libtorch's generator.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in 0..n (n > 0; the modulo bias is below 2^-40 for the sizes mixq uses).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// A standard normal sample (Box–Muller, cosine branch only: one sample per two uniforms).
    pub fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.next_f64().max(1e-300), self.next_f64());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// `n` standard normal samples as `f32`, times `scale`.
    pub fn normals(&mut self, n: usize, scale: f64) -> Vec<f32> {
        (0..n).map(|_| (self.normal() * scale) as f32).collect()
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

/// Keeps glibc's `malloc` from handing the top of its heap back to the kernel after every
/// pass. libtorch frees and re-allocates its intermediate tensors (a few hundred KiB to a few
/// MiB each) on every forward and backward pass; with glibc's defaults the free space at the
/// top of the heap is returned to the kernel as soon as it exceeds the trim threshold, and the
/// next pass takes it back as fresh zero-filled pages — page faults and page clearing were 19 %
/// of an HVP bench's profile (`perf record` of `benches/hvp.rs`, tiny_cnn, 16 probes per pass).
/// This sets the trim threshold to 256 MiB and fixes the mmap threshold at 32 MiB (glibc's own
/// dynamic maximum, so tensors larger than that still come from and go back to `mmap`).
/// Measured on that bench, four interleaved pairs under load: 8–22 % less time per product (see
/// `experiments/pyhessian/README.md`). The binary and the HVP bench call it first; a library
/// user may too. No effect on other C libraries.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
        }
        const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
        const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
        // SAFETY: mallopt only changes two tuning parameters of glibc's allocator; it is safe to
        // call at any time, from any thread, and returns 0 on a value it rejects (ignored: the
        // defaults then stay).
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 32 << 20);
            mallopt(M_TRIM_THRESHOLD, 256 << 20);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_basics() {
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("layer1.conv", "layer1.conv"), 0);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn closest_names_first() {
        let known = ["layer1.0.conv1", "layer1.0.conv2", "fc", "stem.conv"];
        assert_eq!(closest("layer1.0.conv3", known, 2), vec!["layer1.0.conv1", "layer1.0.conv2"]);
    }

    #[test]
    fn atomic_write_replaces_whole_file() {
        let dir = std::env::temp_dir().join(format!("mixq-util-{}", std::process::id()));
        let p = dir.join("out.json");
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        let leftovers: Vec<_> =
            std::fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().contains(".tmp-")).collect();
        assert!(leftovers.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
