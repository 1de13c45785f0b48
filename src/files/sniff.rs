//! What a file is, from its bytes alone: the content type (never the client's label),
//! and for images the pixel size and a BlurHash placeholder.

/// Types a browser could run as a page or script if one were served inline: stored and
/// served as plain bytes instead.
const ACTIVE: [&str; 6] = [
    "text/html",
    "text/xml",
    "application/xml",
    "application/xhtml+xml",
    "image/svg+xml",
    "text/x-shellscript",
];

pub const OCTET_STREAM: &str = "application/octet-stream";

/// The content type of a file starting with `head` (its first few KiB).
pub fn content_type(head: &[u8]) -> &'static str {
    match infer::get(head) {
        Some(t) if !ACTIVE.contains(&t.mime_type()) => t.mime_type(),
        _ => OCTET_STREAM,
    }
}

/// Types safe to show in the browser (`Content-Disposition: inline`); everything else is
/// served as a download.
pub fn inline(content_type: &str) -> bool {
    matches!(
        content_type,
        "image/png"
            | "image/jpeg"
            | "image/gif"
            | "image/webp"
            | "image/avif"
            | "image/bmp"
            | "video/mp4"
            | "video/webm"
            | "video/quicktime"
            | "audio/mpeg"
            | "audio/ogg"
            | "audio/x-wav"
            | "audio/aac"
            | "audio/x-flac"
            | "audio/m4a"
            | "application/pdf"
    )
}

/// Width and height from an image's header, if `head` holds enough of it.
pub fn dimensions(head: &[u8]) -> Option<(u32, u32)> {
    let s = imagesize::blob_size(head).ok()?;
    Some((u32::try_from(s.width).ok()?, u32::try_from(s.height).ok()?))
}

/// Most memory one decode may allocate, whatever the pixel count allowed.
pub const MAX_DECODE_BYTES: u64 = 128 * 1024 * 1024;

/// Decodes a whole image (PNG, JPEG, GIF, WebP) and returns its size and a 4x3 BlurHash,
/// or `None` for anything it cannot decode. Decoding is bounded (8192 px a side,
/// [`MAX_DECODE_BYTES`]) so a small file claiming a huge canvas cannot exhaust memory;
/// callers check the pixel count (`files.max_image_pixels`) from the header first.
/// CPU-heavy: run it on a blocking thread.
pub fn blurhash(bytes: &[u8]) -> Option<(u32, u32, String)> {
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .ok()?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(8192);
    limits.max_image_height = Some(8192);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    let img = reader.decode().ok()?;
    let (w, h) = (img.width(), img.height());
    let small = img.thumbnail(32, 32).to_rgba8();
    let hash = blurhash::encode(4, 3, small.width(), small.height(), small.as_raw()).ok()?;
    Some((w, h, hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_is_never_a_web_page() {
        assert_eq!(
            content_type(b"<!DOCTYPE html><script>x</script>"),
            OCTET_STREAM
        );
        assert_eq!(content_type(b"<html><body>hi"), OCTET_STREAM);
        assert_eq!(content_type(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"), "image/png");
        assert!(!inline(OCTET_STREAM));
        assert!(inline("image/png"));
    }
}
