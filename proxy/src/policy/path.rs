//! The path a request's route and limits are decided on: its target's path, normalised as
//! nginx normalises it for `location` matching, so that `/%6clm`, `//llm` and `/x/../llm`
//! are all `/llm`. The backend still gets the target as the client sent it.
//!
//! - percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded; every other
//!   escape stays as it is (upper-cased), so `%2F` is not a path separator, and a `%` that
//!   starts no escape is written as `%25`;
//! - `//` runs are merged (nginx `merge_slashes on`);
//! - `.` segments are dropped and `..` removes the segment before it; a `..` above the root
//!   stays at the root;
//! - matching is case-sensitive, as nginx's `location` (without `~*`) is.

use std::borrow::Cow;

/// The normalised path of a request target (origin form; the query is not part of it).
pub fn normalize(target: &str) -> Cow<'_, str> {
    let end = target
        .bytes()
        .position(|b| b == b'?' || b == b'#')
        .unwrap_or(target.len());
    let path = &target[..end];
    if is_normal(path) {
        return Cow::Borrowed(path);
    }
    let decoded = decode_unreserved(path);
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let trailing = decoded.ends_with('/')
        || decoded.ends_with("/.")
        || decoded.ends_with("/..")
        || decoded == "."
        || decoded == "..";
    let mut s = String::with_capacity(decoded.len());
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if s.is_empty() || (trailing && !out.is_empty()) {
        s.push('/');
    }
    Cow::Owned(s)
}

/// Nothing to do: starts with `/`, no `%`, no `//`, no `.` segment. Nearly every request.
fn is_normal(path: &str) -> bool {
    // One tight pass for nearly every request; the exact rules only when a `%`, `//` or `/.`
    // shows up (`/.well-known/` is normal).
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return false;
    }
    let mut prev = 0u8;
    for &c in b {
        if c == b'%' || (prev == b'/' && (c == b'/' || c == b'.')) {
            return is_normal_exactly(b);
        }
        prev = c;
    }
    true
}

fn is_normal_exactly(b: &[u8]) -> bool {
    if b.contains(&b'%') {
        return false;
    }
    let mut prev = b'/';
    for (i, &c) in b.iter().enumerate().skip(1) {
        if c == b'/' && prev == b'/' {
            return false;
        }
        if c == b'.' && prev == b'/' {
            let rest = &b[i..];
            if rest == b"." || rest == b".." || rest.starts_with(b"./") || rest.starts_with(b"../")
            {
                return false;
            }
        }
        prev = c;
    }
    true
}

fn decode_unreserved(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                let c = (h * 16 + l) as u8;
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    out.push(c as char);
                } else {
                    out.push('%');
                    out.push(b[i + 1].to_ascii_uppercase() as char);
                    out.push(b[i + 2].to_ascii_uppercase() as char);
                }
                i += 3;
                continue;
            }
        }
        if b[i] == b'%' {
            // Not an escape: written as one, so normalising again changes nothing.
            out.push_str("%25");
            i += 1;
            continue;
        }
        // `path` is a &str: push whole characters.
        let ch = path[i..].chars().next().expect("in bounds");
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_like_normalisation() {
        for (raw, want) in [
            ("/llm", "/llm"),
            ("/llm?x=1", "/llm"),
            ("/%6clm", "/llm"),
            ("/%6Clm/", "/llm/"),
            ("//llm", "/llm"),
            ("/a//b///c", "/a/b/c"),
            ("/api/../llm", "/llm"),
            ("/api/./llm", "/api/llm"),
            ("/../../llm", "/llm"),
            ("/a/b/..", "/a/"),
            ("/a/%2e%2e/llm", "/llm"),
            ("/a%2Fb", "/a%2Fb"),
            ("/a%2fb", "/a%2Fb"),
            ("/%zz", "/%25zz"),
            ("/%", "/%25"),
            ("/x%4", "/x%254"),
            ("/", "/"),
            ("", "/"),
            ("/LLM", "/LLM"),
            ("/é/../a", "/a"),
        ] {
            assert_eq!(normalize(raw), want, "{raw}");
        }
    }

    /// Normalising twice changes nothing, and the result never holds `//`, `/./` or `/../`.
    #[test]
    fn normalisation_is_idempotent_on_random_paths() {
        let (seed, mut next) = crate::policy::testing::seeded();
        let parts = [
            "/", "a", ".", "..", "%2e", "%2F", "%41", "//", "%", "b", "~",
        ];
        for _ in 0..2000 {
            let mut p = String::new();
            for _ in 0..next() % 9 {
                p.push_str(parts[(next() % parts.len() as u64) as usize]);
            }
            let once = normalize(&p).into_owned();
            assert_eq!(normalize(&once), once, "seed {seed}: {p:?}");
            assert!(once.starts_with('/'), "seed {seed}: {p:?} -> {once}");
            for bad in ["//", "/./", "/../"] {
                assert!(!once.contains(bad), "seed {seed}: {p:?} -> {once}");
            }
        }
    }
}
