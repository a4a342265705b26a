//! One HTTP request as authorization sees it, and Istio's path normalization.
//!
//! Istio normalizes the request path before its authorization filter matches `paths`
//! and forwards the normalized path (mesh config `pathNormalization`, Envoy's
//! `normalize_path`, `merge_slashes` and `path_with_escaped_slashes_action`).
//! [`normalize_path`] does the same for each [`PathNormalization`]:
//!
//! - `NONE`: the path as sent (query and fragment removed).
//! - `BASE` (Istio's mesh default): RFC 3986 normalization as Envoy's `normalize_path`
//!   does it: percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) decoded,
//!   `\` turned into `/`, `.` and `..` segments resolved; `%2F` and `%5C` kept as they
//!   are (Envoy `KEEP_UNCHANGED`).
//! - `MERGE_SLASHES`: `BASE` with runs of `/` merged into one before dot segments are
//!   resolved. Envoy merges after, so `/x//../admin` is `/x/admin` to Envoy but `/admin`
//!   here, as applications read it (Go's `path.Clean`, nginx): a DENY on `/admin*` holds.
//! - `DECODE_AND_MERGE_SLASHES`: `%2F`/`%2f` decoded to `/` and `%5C`/`%5c` to `\`
//!   first (Envoy `UNESCAPE_AND_FORWARD`), then `MERGE_SLASHES`.
//!
//! In every mode a path that does not begin with `/` or that holds a NUL (raw or `%00`)
//! cannot be normalized: the request is denied, as Envoy answers it with 400. Outside
//! `NONE`, so is a path whose decoding spells a new escape: the rules would see one
//! path and an application that decodes again another.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Istio's `meshConfig.pathNormalization.normalization` values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PathNormalization {
    None,
    Base,
    MergeSlashes,
    /// This tunnel's default (Istio's is `BASE`): a DENY on `/admin*` must not be
    /// escaped with `//admin` or `/%2Fadmin`, and the destination tunnel is the only
    /// place the rule is enforced.
    #[default]
    DecodeAndMergeSlashes,
}

impl fmt::Display for PathNormalization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathNormalization::None => "NONE",
            PathNormalization::Base => "BASE",
            PathNormalization::MergeSlashes => "MERGE_SLASHES",
            PathNormalization::DecodeAndMergeSlashes => "DECODE_AND_MERGE_SLASHES",
        })
    }
}

/// A request path that cannot be normalized; such a request is denied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("path {path:?} cannot be normalized: {problem}")]
pub struct PathError {
    pub path: String,
    pub problem: &'static str,
}

/// One HTTP request: the method, the normalized path (no query), the authority (`Host`
/// or `:authority`, with its port if sent) and the headers.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub host: Option<&'a str>,
    pub headers: &'a http::HeaderMap,
}

impl Request<'_> {
    /// The values of header `name` joined with `,` (as Envoy's header matcher sees a
    /// repeated header), or `None` when absent.
    pub fn header(&self, name: &str) -> Option<String> {
        let mut values = self.headers.get_all(name).iter().peekable();
        values.peek()?;
        let joined: Vec<&str> = values.map(|v| v.to_str().unwrap_or_default()).collect();
        Some(joined.join(","))
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// What authorization reads from a request's head: its path normalized under `mode`,
/// and its authority (`:authority` or the absolute-form target's, else `Host`).
pub fn path_and_host(
    request: &http::request::Parts,
    mode: PathNormalization,
) -> Result<(String, Option<&str>), PathError> {
    let target = request
        .uri
        .path_and_query()
        .map_or_else(|| request.uri.path(), |p| p.as_str());
    let path = normalize_path(target, mode)?;
    let host = request.uri.authority().map(|a| a.as_str()).or_else(|| {
        request
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
    });
    Ok((path, host))
}

/// The normalized path of `path_and_query` (a request target in origin form) under
/// `mode`; the query and fragment are not part of it.
///
/// A path whose decoding spells a new escape (`/%2%66admin` decodes to `/%2fadmin`,
/// which an application that decodes again reads as `//admin`) cannot be normalized:
/// the rules would see one path and the application another. So normalizing a
/// normalized path gives it back unchanged.
///
/// Where slashes are merged, they are merged before dot segments are resolved, as most
/// applications read a path (Go's `path.Clean`, nginx): `/x//../admin` is `/admin`, not
/// `/x/admin` (the empty segment between the slashes is not one `..` can remove).
pub fn normalize_path(path_and_query: &str, mode: PathNormalization) -> Result<String, PathError> {
    let once = normalize_once(path_and_query, mode)?;
    // Without an escape left, a second pass has nothing to decode: its output has no
    // dot segment (nor an empty one where slashes are merged) to resolve again.
    if !once.contains('%') {
        return Ok(once);
    }
    match normalize_once(&once, mode) {
        Ok(twice) if twice == once => Ok(once),
        _ => Err(PathError {
            path: path_and_query.to_string(),
            problem: "decoding it spells another escape",
        }),
    }
}

fn normalize_once(path_and_query: &str, mode: PathNormalization) -> Result<String, PathError> {
    let error = |problem| PathError {
        path: path_and_query.to_string(),
        problem,
    };
    let end = path_and_query
        .find(['?', '#'])
        .unwrap_or(path_and_query.len());
    let raw = &path_and_query[..end];
    if !raw.starts_with('/') {
        return Err(error("it does not begin with /"));
    }
    if raw.contains('\0') {
        return Err(error("it contains a NUL character"));
    }
    // Percent escapes: the NUL check in every mode; decoding outside NONE.
    let bytes = raw.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            let c = h * 16 + l;
            if c == 0 {
                return Err(error("it contains %00"));
            }
            let decode = match mode {
                PathNormalization::None => false,
                PathNormalization::Base | PathNormalization::MergeSlashes => is_unreserved(c),
                PathNormalization::DecodeAndMergeSlashes => {
                    is_unreserved(c) || c == b'/' || c == b'\\'
                }
            };
            if decode {
                decoded.push(c);
            } else {
                decoded.extend_from_slice(&bytes[i..i + 3]);
            }
            i += 3;
            continue;
        }
        decoded.push(b);
        i += 1;
    }
    if mode == PathNormalization::None {
        return Ok(raw.to_string());
    }
    for b in &mut decoded {
        if *b == b'\\' {
            *b = b'/';
        }
    }
    // Only ASCII bytes were decoded into the UTF-8 input: the result is UTF-8.
    let path = String::from_utf8_lossy(&decoded).into_owned();
    let merge = mode != PathNormalization::Base;
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, segment) in segments.into_iter().enumerate() {
        match segment {
            // An empty segment is a doubled slash, or the one ending the path.
            "" if merge && i != last => {}
            "." => {}
            ".." => {
                out.pop();
            }
            s => {
                out.push(s);
                continue;
            }
        }
        // A trailing `.` or `..` leaves the path ending in `/`.
        if i == last {
            out.push("");
        }
    }
    Ok(format!("/{}", out.join("/")))
}
