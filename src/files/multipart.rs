//! A `multipart/form-data` upload (RFC 7578; the body grammar of RFC 2046 section 5.1.1):
//! what a browser's `FormData`, an HTML `<form enctype="multipart/form-data">` and
//! `curl -F file=@x` send. parley takes exactly one part, a file (its
//! `Content-Disposition` has a `filename`), and streams that part's bytes out as they
//! arrive; the envelope (boundaries, part headers) is never stored.
//!
//! Everything around the file's bytes is bounded: the preamble ([`MAX_PREAMBLE`]), the
//! part's header block ([`MAX_HEADER_BYTES`], [`MAX_HEADERS`] lines), the epilogue
//! ([`MAX_EPILOGUE`]); the file's own bytes are bounded by the caller (`Files`, with
//! `files.max_file_bytes` and the quota, exactly as for a raw upload). The parser holds at
//! most one chunk of the body plus a boundary's length.
//!
//! Not `multer` (what axum's `Multipart` uses): it buffers a part's header block until
//! it sees the blank line, bounded only by its whole-stream limit, with a fixed 32-header
//! cap, and it brings `encoding_rs` for text fields parley never reads. One file part
//! needs far less than a general form parser.

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt, stream::BoxStream};

/// Bytes before the first boundary (RFC 2046 allows a preamble; browsers send none).
pub const MAX_PREAMBLE: usize = 1024;
/// The part's boundary line and header block, in bytes.
pub const MAX_HEADER_BYTES: usize = 8 * 1024;
/// Header lines in the part.
pub const MAX_HEADERS: usize = 16;
/// Bytes after the closing boundary (curl and browsers send a CRLF).
pub const MAX_EPILOGUE: usize = 1024;
/// The longest boundary RFC 2046 allows.
const MAX_BOUNDARY: usize = 70;
/// Most bytes a body may have beyond its file's: preamble, boundaries, headers, epilogue.
pub const ENVELOPE_BYTES: u64 =
    (MAX_PREAMBLE + 2 * MAX_HEADER_BYTES + MAX_EPILOGUE + 4 * (MAX_BOUNDARY + 8)) as u64;

/// A body that is not one well-formed file part.
#[derive(Debug, thiserror::Error)]
pub enum MultipartError {
    #[error("multipart/form-data needs a boundary parameter of 1 to 70 characters")]
    Boundary,
    #[error("multipart body: no boundary within the first {MAX_PREAMBLE} bytes")]
    Preamble,
    #[error(
        "multipart body: the part's headers exceed {MAX_HEADER_BYTES} bytes or {MAX_HEADERS} lines"
    )]
    HeadersTooLarge,
    #[error("multipart body: {0}")]
    Malformed(&'static str),
    #[error(
        "multipart body: the part is not a file (Content-Disposition: form-data; name=\"file\"; filename=\"...\")"
    )]
    NotAFile,
    #[error("multipart body: exactly one part, the file, is accepted")]
    OnePart,
    #[error("multipart body: more than {MAX_EPILOGUE} bytes after the closing boundary")]
    Epilogue,
    #[error("multipart body: Content-Transfer-Encoding {0:?} is not supported")]
    Encoding(String),
    #[error("the upload sent nothing for {}s", .0.as_secs())]
    Idle(Duration),
    #[error("{0}")]
    Body(String),
}

/// The `boundary` parameter of a `multipart/form-data` Content-Type.
pub fn boundary(content_type: &str) -> Result<String, MultipartError> {
    let value = content_type
        .split(';')
        .skip(1)
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
        .map(|(_, v)| v.trim())
        .ok_or(MultipartError::Boundary)?;
    let value = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    if value.is_empty()
        || value.len() > MAX_BOUNDARY
        || !value.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
    {
        return Err(MultipartError::Boundary);
    }
    Ok(value.to_string())
}

/// The one file part of a multipart body, its headers read.
pub struct FilePart {
    /// The `filename` of its `Content-Disposition`, as sent (not yet cleaned).
    pub filename: String,
    parser: Parser,
}

impl FilePart {
    /// Reads `body` up to the file's first byte. `idle`: the longest wait for more bytes.
    pub async fn open<S, E>(body: S, boundary: &str, idle: Duration) -> Result<Self, MultipartError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let mut parser = Parser {
            body: body.map(|r| r.map_err(|e| e.to_string())).boxed(),
            // The first boundary may open the body: with a CRLF in front it is found like
            // every other delimiter.
            buf: BytesMut::from(&b"\r\n"[..]),
            delimiter: format!("\r\n--{boundary}").into_bytes(),
            idle,
            eof: false,
            done: false,
        };
        let filename = parser.headers().await?;
        Ok(Self { filename, parser })
    }

    /// The file's bytes; ends after the closing boundary, or with an error for a body
    /// that turns out malformed (the upload is then refused).
    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes, MultipartError>> + Send {
        futures_util::stream::unfold(self.parser, |mut p| async move {
            let item = p.next_data().await?;
            Some((item, p))
        })
    }
}

struct Parser {
    body: BoxStream<'static, Result<Bytes, String>>,
    /// Read and not yet consumed.
    buf: BytesMut,
    /// CRLF, `--`, the boundary.
    delimiter: Vec<u8>,
    idle: Duration,
    eof: bool,
    /// The stream has ended (or failed): nothing more comes out.
    done: bool,
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(haystack, needle)
}

impl Parser {
    /// Reads one more chunk; false at the end of the body.
    async fn fill(&mut self) -> Result<bool, MultipartError> {
        if self.eof {
            return Ok(false);
        }
        let next = tokio::time::timeout(self.idle, self.body.next())
            .await
            .map_err(|_| MultipartError::Idle(self.idle))?;
        match next {
            Some(chunk) => {
                self.buf
                    .extend_from_slice(&chunk.map_err(MultipartError::Body)?);
                Ok(true)
            }
            None => {
                self.eof = true;
                Ok(false)
            }
        }
    }

    /// Reads until `needle` is in the buffer, past at most `limit` bytes; its offset.
    async fn until(
        &mut self,
        needle: &[u8],
        limit: usize,
        over: MultipartError,
    ) -> Result<usize, MultipartError> {
        loop {
            if let Some(i) = find(
                &self.buf[..self.buf.len().min(limit + needle.len())],
                needle,
            ) {
                return Ok(i);
            }
            if self.buf.len() >= limit + needle.len() {
                return Err(over);
            }
            if !self.fill().await? {
                return Err(MultipartError::Malformed(
                    "the body ended inside the envelope",
                ));
            }
        }
    }

    /// Reads the preamble, the first boundary and the part's headers; the file name.
    async fn headers(&mut self) -> Result<String, MultipartError> {
        let delimiter = self.delimiter.clone();
        let at = self
            .until(&delimiter, MAX_PREAMBLE + 2, MultipartError::Preamble)
            .await?;
        self.buf.advance(at + delimiter.len());
        // The rest of the boundary line: `--` closes the body (no part at all), else
        // optional transport padding.
        let eol = self
            .until(b"\r\n", MAX_HEADER_BYTES, MultipartError::HeadersTooLarge)
            .await?;
        let line = &self.buf[..eol];
        if line.starts_with(b"--") {
            return Err(MultipartError::NotAFile);
        }
        if !line.iter().all(|b| *b == b' ' || *b == b'\t') {
            return Err(MultipartError::Malformed("text after the boundary"));
        }
        self.buf.advance(eol + 2);
        // The header block ends with an empty line (it may be empty itself).
        let block = if self.buf.starts_with(b"\r\n") {
            0
        } else {
            let end = self
                .until(
                    b"\r\n\r\n",
                    MAX_HEADER_BYTES,
                    MultipartError::HeadersTooLarge,
                )
                .await?;
            end + 2
        };
        let headers = self.buf.split_to(block);
        self.buf.advance(2);
        let mut filename = None;
        for (n, line) in headers[..]
            .split(|b| *b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .filter(|l| !l.is_empty())
            .enumerate()
        {
            if n >= MAX_HEADERS {
                return Err(MultipartError::HeadersTooLarge);
            }
            let line = String::from_utf8_lossy(line);
            let Some((name, value)) = line.split_once(':') else {
                return Err(MultipartError::Malformed(
                    "a part header line without a colon",
                ));
            };
            let name = name.trim();
            if name.eq_ignore_ascii_case("content-disposition") {
                filename = form_data_filename(value);
            } else if name.eq_ignore_ascii_case("content-transfer-encoding") {
                let v = value.trim();
                if !["binary", "8bit", "7bit"]
                    .iter()
                    .any(|ok| v.eq_ignore_ascii_case(ok))
                {
                    return Err(MultipartError::Encoding(v.to_string()));
                }
            }
        }
        filename.ok_or(MultipartError::NotAFile)
    }

    /// The next piece of the file, `None` after the closing boundary.
    async fn next_data(&mut self) -> Option<Result<Bytes, MultipartError>> {
        if self.done {
            return None;
        }
        let item = self.data().await;
        if !matches!(item, Some(Ok(_))) {
            self.done = true;
        }
        item
    }

    async fn data(&mut self) -> Option<Result<Bytes, MultipartError>> {
        loop {
            match find(&self.buf, &self.delimiter) {
                Some(0) => {
                    let n = self.delimiter.len();
                    self.buf.advance(n);
                    return self.close().await.err().map(Err);
                }
                Some(i) => return Some(Ok(self.buf.split_to(i).freeze())),
                None => {
                    // The tail may be the start of the delimiter: keep it.
                    let keep = self.delimiter.len() - 1;
                    if self.buf.len() > keep {
                        let n = self.buf.len() - keep;
                        return Some(Ok(self.buf.split_to(n).freeze()));
                    }
                    match self.fill().await {
                        Ok(true) => {}
                        Ok(false) => {
                            return Some(Err(MultipartError::Malformed(
                                "the body ended before its closing boundary",
                            )));
                        }
                        Err(e) => return Some(Err(e)),
                    }
                }
            }
        }
    }

    /// After the file's delimiter: the body must close here, then end within
    /// [`MAX_EPILOGUE`] bytes.
    async fn close(&mut self) -> Result<(), MultipartError> {
        while self.buf.len() < 2 {
            if !self.fill().await? {
                return Err(MultipartError::Malformed(
                    "the body ended inside a boundary",
                ));
            }
        }
        if !self.buf.starts_with(b"--") {
            return Err(MultipartError::OnePart);
        }
        loop {
            if self.buf.len() > MAX_EPILOGUE + 2 {
                return Err(MultipartError::Epilogue);
            }
            if !self.fill().await? {
                return Ok(());
            }
        }
    }
}

/// The `filename` of a `form-data` Content-Disposition value, if it has one. Quoted
/// strings take the HTML form encoding of `"`, CR and LF (`%22`, `%0D`, `%0A`: what
/// browsers and curl send) and, from older curl, `\"`.
fn form_data_filename(value: &str) -> Option<String> {
    let value = value.trim();
    let rest = value
        .get(..9)
        .filter(|k| k.eq_ignore_ascii_case("form-data"))
        .map(|_| &value[9..])?;
    let mut chars = rest.chars().peekable();
    let mut filename = None;
    loop {
        // `; key=value`
        while chars.next_if(|c| c.is_whitespace() || *c == ';').is_some() {}
        let key: String =
            std::iter::from_fn(|| chars.next_if(|c| *c != '=' && *c != ';')).collect();
        if key.is_empty() && chars.peek().is_none() {
            break;
        }
        let mut val = String::new();
        if chars.next_if_eq(&'=').is_some() {
            while chars.next_if(|c| *c == ' ' || *c == '\t').is_some() {}
            if chars.next_if_eq(&'"').is_some() {
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        // Old curl escaped a quote so; a backslash alone is literal
                        // (browsers send Windows paths as they are).
                        '\\' if chars.next_if_eq(&'"').is_some() => val.push('"'),
                        c => val.push(c),
                    }
                }
            } else {
                val = std::iter::from_fn(|| chars.next_if(|c| *c != ';'))
                    .collect::<String>()
                    .trim()
                    .to_string();
            }
        }
        if key.trim().eq_ignore_ascii_case("filename") {
            filename = Some(
                val.replace("%22", "\"")
                    .replace("%0D", "\r")
                    .replace("%0A", "\n"),
            );
        }
    }
    filename
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(parts: &[&[u8]]) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
        let parts: Vec<Bytes> = parts.iter().map(|p| Bytes::copy_from_slice(p)).collect();
        futures_util::stream::iter(parts.into_iter().map(Ok))
    }

    async fn parse(chunks: &[&[u8]]) -> Result<(String, Vec<u8>), MultipartError> {
        let part = FilePart::open(body(chunks), "XyZ", Duration::from_secs(5)).await?;
        let name = part.filename.clone();
        let mut out = Vec::new();
        let mut s = std::pin::pin!(part.into_stream());
        while let Some(b) = s.next().await {
            out.extend_from_slice(&b?);
        }
        Ok((name, out))
    }

    const FORM: &[u8] = b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a b.txt\"\r\nContent-Type: text/plain\r\n\r\nhello\r\n--XyY\r\n-XyZ--\r\n\r\n--XyZ--\r\n";

    #[tokio::test]
    async fn one_file_part_split_anywhere() {
        let (name, data) = parse(&[FORM]).await.unwrap();
        assert_eq!(name, "a b.txt");
        assert_eq!(data, b"hello\r\n--XyY\r\n-XyZ--\r\n");
        for cut in 1..FORM.len() {
            let got = parse(&[&FORM[..cut], &FORM[cut..]]).await.unwrap();
            assert_eq!(got, (name.clone(), data.clone()), "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = FORM.chunks(1).collect();
        assert_eq!(parse(&bytes).await.unwrap(), (name, data));
    }

    #[tokio::test]
    async fn envelopes_that_are_refused() {
        let err = |r: Result<(String, Vec<u8>), MultipartError>| r.unwrap_err().to_string();
        // Two parts.
        let two = b"--XyZ\r\nContent-Disposition: form-data; name=\"a\"; filename=\"a\"\r\n\r\n1\r\n--XyZ\r\nContent-Disposition: form-data; name=\"b\"\r\n\r\n2\r\n--XyZ--";
        assert!(err(parse(&[two]).await).contains("exactly one part"));
        // A text field, not a file.
        let text = b"--XyZ\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--XyZ--";
        assert!(err(parse(&[text]).await).contains("not a file"));
        // No closing boundary.
        let open =
            b"--XyZ\r\nContent-Disposition: form-data; name=\"a\"; filename=\"a\"\r\n\r\n1234";
        assert!(err(parse(&[open]).await).contains("ended before"));
        // Huge headers, a long preamble, a long epilogue, base64.
        let long = format!("--XyZ\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEADER_BYTES + 10));
        assert!(err(parse(&[long.as_bytes()]).await).contains("headers exceed"));
        let many = format!("--XyZ\r\n{}\r\n", "X: 1\r\n".repeat(MAX_HEADERS + 1));
        assert!(err(parse(&[many.as_bytes()]).await).contains("headers exceed"));
        let pre = vec![b'p'; MAX_PREAMBLE + 10];
        assert!(err(parse(&[&pre, FORM]).await).contains("no boundary"));
        let epi = vec![b'e'; MAX_EPILOGUE + 10];
        assert!(err(parse(&[FORM, &epi]).await).contains("after the closing"));
        let b64 = b"--XyZ\r\nContent-Disposition: form-data; name=\"a\"; filename=\"a\"\r\nContent-Transfer-Encoding: base64\r\n\r\nAA==\r\n--XyZ--";
        assert!(err(parse(&[b64]).await).contains("base64"));
        // A preamble is fine.
        let (_, data) = parse(&[b"ignored\r\n", FORM]).await.unwrap();
        assert!(data.starts_with(b"hello"));
    }

    #[test]
    fn boundaries_and_file_names() {
        assert_eq!(
            boundary("multipart/form-data; boundary=----WebKitFormBoundaryx7").unwrap(),
            "----WebKitFormBoundaryx7"
        );
        assert_eq!(
            boundary("multipart/form-data;charset=utf-8; BOUNDARY=\"a b\"").unwrap(),
            "a b"
        );
        assert!(boundary("multipart/form-data").is_err());
        assert!(boundary(&format!("multipart/form-data; boundary={}", "x".repeat(71))).is_err());
        let f = |v| form_data_filename(v);
        assert_eq!(
            f(r#"form-data; name="file"; filename="x.png""#).as_deref(),
            Some("x.png")
        );
        assert_eq!(
            f(r#"form-data; filename=plain.txt; name=f"#).as_deref(),
            Some("plain.txt")
        );
        assert_eq!(
            f(r#"form-data; name="f"; filename="a\"b;c""#).as_deref(),
            Some("a\"b;c")
        );
        assert_eq!(
            f(r#"form-data; name="f"; filename="a%22b%0A""#).as_deref(),
            Some("a\"b\n")
        );
        assert_eq!(
            f(r#"form-data; filename="C:\x\y.txt""#).as_deref(),
            Some("C:\\x\\y.txt")
        );
        assert_eq!(f(r#"form-data; name="filename""#), None);
        assert_eq!(f(r#"attachment; filename="x""#), None);
    }
}
