use super::table::{Index, Table};
use super::{huffman, Header};

use bytes::{BufMut, BytesMut};
use http::header::{HeaderName, HeaderValue};

const DEFAULT_MAX_ALLOWED_SIZE: usize = 4 * 1024;

#[derive(Debug)]
pub struct Encoder {
    table: Table,
    /// PARLEY PATCH (the encoder's state in 32-bit counts): a `u32`, at most
    /// `MAX_TABLE_SIZE`, as the table's sizes and the size updates are (56 bytes of
    /// every connection, not 88).
    max_allowed_size: u32,
    size_update: Option<SizeUpdate>,
    // PARLEY PATCH (no header block buffer kept): no `scratch` field; it was always
    // empty between header blocks (32 bytes of every connection).
}

/// PARLEY PATCH (no header block buffer kept): what `take_scratch` reserves.
const SCRATCH_CAPACITY: usize = 256;

#[derive(Debug, Copy, Clone, Eq, PartialEq)]
enum SizeUpdate {
    // PARLEY PATCH (the encoder's state in 32-bit counts): `u32`s.
    One(u32),
    Two(u32, u32), // min, max
}

/// PARLEY PATCH (the encoder's state in 32-bit counts): the largest table size an
/// encoder takes (2 GiB: SETTINGS_HEADER_TABLE_SIZE is 32 bits; with a table held in
/// `u32`s below half their range, an entry's size and the bytes of evicted entries kept
/// until the buffer needs room cannot overflow them). A larger `set_max_allowed_size`
/// is taken as this.
pub(crate) const MAX_TABLE_SIZE: usize = (u32::MAX >> 1) as usize;

impl Encoder {
    pub fn new(max_size: usize, capacity: usize) -> Encoder {
        let max_size = max_size.min(DEFAULT_MAX_ALLOWED_SIZE);

        Encoder {
            table: Table::new(max_size, capacity),
            max_allowed_size: DEFAULT_MAX_ALLOWED_SIZE as u32,
            size_update: None,
        }
    }

    /// PARLEY PATCH (send header table size): no longer test-only; the largest
    /// dynamic table this encoder uses, whatever the peer allows (RFC 7541 section
    /// 4.2: an encoder may use less than the decoder's maximum, and says so with a
    /// dynamic table size update).
    pub fn set_max_allowed_size(&mut self, max: usize) {
        // PARLEY PATCH (the encoder's state in 32-bit counts)
        let max = max.min(MAX_TABLE_SIZE);
        self.max_allowed_size = max as u32;

        if self.table.max_size() > max {
            self.update_max_size(max);
        }
    }

    /// Takes the reusable buffer for one header-block encode.
    ///
    /// The buffer is returned by `return_scratch` once the encoded block has
    /// been copied into the write buffer. If it is not returned - the
    /// CONTINUATION path keeps it, since the remainder is still needed - the
    /// next call simply starts from a fresh buffer.
    pub(crate) fn take_scratch(&mut self) -> BytesMut {
        // PARLEY PATCH (no header block buffer kept): a buffer of a header block's
        // usual size, so that encoding one does not grow it several times.
        BytesMut::with_capacity(SCRATCH_CAPACITY)
    }

    /// Returns a fully-written header block buffer for reuse.
    ///
    /// PARLEY PATCH (no header block buffer kept): the buffer is dropped instead.
    /// A connection sends a header block per response, and one that waits (an event
    /// stream, a pending long-poll) held it (~256 bytes) for its whole life; an
    /// allocation per header block is what that costs.
    pub(crate) fn return_scratch(&mut self, scratch: BytesMut) {
        drop(scratch);
    }

    /// Queues a max size update.
    ///
    /// The next call to `encode` will include a dynamic size update frame.
    pub fn update_max_size(&mut self, val: usize) {
        // PARLEY PATCH (the encoder's state in 32-bit counts): at most
        // `max_allowed_size`, so a `u32`.
        let val = val.min(self.max_allowed_size as usize) as u32;
        let table_max = self.table.max_size() as u32;

        match self.size_update {
            Some(SizeUpdate::One(old)) => {
                if val > old {
                    if old > table_max {
                        self.size_update = Some(SizeUpdate::One(val));
                    } else {
                        self.size_update = Some(SizeUpdate::Two(old, val));
                    }
                } else {
                    self.size_update = Some(SizeUpdate::One(val));
                }
            }
            Some(SizeUpdate::Two(min, _)) => {
                if val < min {
                    self.size_update = Some(SizeUpdate::One(val));
                } else {
                    self.size_update = Some(SizeUpdate::Two(min, val));
                }
            }
            None => {
                if val != table_max {
                    // Don't bother writing a frame if the value already matches
                    // the table's max size.
                    self.size_update = Some(SizeUpdate::One(val));
                }
            }
        }
    }

    /// Encode a set of headers into the provide buffer
    pub fn encode<I>(&mut self, headers: I, dst: &mut BytesMut)
    where
        I: IntoIterator<Item = Header<Option<HeaderName>>>,
    {
        let span = tracing::trace_span!("hpack::encode");
        let _e = span.enter();

        self.encode_size_updates(dst);

        let mut last_index = None;

        for header in headers {
            match header.reify() {
                // The header has an associated name. In which case, try to
                // index it in the table.
                Ok(header) => {
                    let index = self.table.index(header);
                    self.encode_header(&index, dst);

                    last_index = Some(index);
                }
                // The header does not have an associated name. This means that
                // the name is the same as the previously yielded header. In
                // which case, we skip table lookup and just use the same index
                // as the previous entry.
                Err(value) => {
                    self.encode_header_without_name(
                        last_index.as_ref().unwrap_or_else(|| {
                            panic!("encoding header without name, but no previous index to use for name");
                        }),
                        &value,
                        dst,
                    );
                }
            }
        }

        // PARLEY PATCH (shared table bytes): the block is encoded; a table it changed
        // takes the shared copy of its bytes.
        self.table.settle();
    }

    fn encode_size_updates(&mut self, dst: &mut BytesMut) {
        match self.size_update.take() {
            Some(SizeUpdate::One(val)) => {
                self.table.resize(val as usize);
                encode_size_update(val as usize, dst);
            }
            Some(SizeUpdate::Two(min, max)) => {
                self.table.resize(min as usize);
                self.table.resize(max as usize);
                encode_size_update(min as usize, dst);
                encode_size_update(max as usize, dst);
            }
            None => {}
        }
    }

    fn encode_header(&mut self, index: &Index, dst: &mut BytesMut) {
        match *index {
            Index::Indexed(idx, _) => {
                encode_int(idx, 7, 0x80, dst);
            }
            Index::Name(idx, _) => {
                let header = self.table.resolve(index);

                encode_not_indexed(idx, header.value_slice(), header.is_sensitive(), dst);
            }
            Index::Inserted(_) => {
                let header = self.table.resolve(index);

                assert!(!header.is_sensitive());

                dst.put_u8(0b0100_0000);

                encode_str(header.name().as_slice(), dst);
                encode_str(header.value_slice(), dst);
            }
            Index::InsertedValue(idx, _) => {
                let header = self.table.resolve(index);

                assert!(!header.is_sensitive());

                encode_int(idx, 6, 0b0100_0000, dst);
                encode_str(header.value_slice(), dst);
            }
            Index::NotIndexed(_) => {
                let header = self.table.resolve(index);

                encode_not_indexed2(
                    header.name().as_slice(),
                    header.value_slice(),
                    header.is_sensitive(),
                    dst,
                );
            }
        }
    }

    fn encode_header_without_name(
        &mut self,
        last: &Index,
        value: &HeaderValue,
        dst: &mut BytesMut,
    ) {
        match *last {
            Index::Indexed(..)
            | Index::Name(..)
            | Index::Inserted(..)
            | Index::InsertedValue(..) => {
                let idx = self.table.resolve_idx(last);

                encode_not_indexed(idx, value.as_ref(), value.is_sensitive(), dst);
            }
            Index::NotIndexed(_) => {
                let last = self.table.resolve(last);

                encode_not_indexed2(
                    last.name().as_slice(),
                    value.as_ref(),
                    value.is_sensitive(),
                    dst,
                );
            }
        }
    }
}

impl Default for Encoder {
    fn default() -> Encoder {
        Encoder::new(4096, 0)
    }
}

fn encode_size_update(val: usize, dst: &mut BytesMut) {
    encode_int(val, 5, 0b0010_0000, dst)
}

fn encode_not_indexed(name: usize, value: &[u8], sensitive: bool, dst: &mut BytesMut) {
    if sensitive {
        encode_int(name, 4, 0b10000, dst);
    } else {
        encode_int(name, 4, 0, dst);
    }

    encode_str(value, dst);
}

fn encode_not_indexed2(name: &[u8], value: &[u8], sensitive: bool, dst: &mut BytesMut) {
    if sensitive {
        dst.put_u8(0b10000);
    } else {
        dst.put_u8(0);
    }

    encode_str(name, dst);
    encode_str(value, dst);
}

fn encode_str(val: &[u8], dst: &mut BytesMut) {
    if !val.is_empty() {
        let idx = position(dst);

        // Push a placeholder byte for the length header
        dst.put_u8(0);

        // Encode with huffman
        huffman::encode(val, dst);

        let huff_len = position(dst) - (idx + 1);

        if encode_int_one_byte(huff_len, 7) {
            // Write the string head
            dst[idx] = 0x80 | huff_len as u8;
        } else {
            // Write the head to a placeholder
            const PLACEHOLDER_LEN: usize = 8;
            let mut buf = [0u8; PLACEHOLDER_LEN];

            let head_len = {
                let mut head_dst = &mut buf[..];
                encode_int(huff_len, 7, 0x80, &mut head_dst);
                PLACEHOLDER_LEN - head_dst.remaining_mut()
            };

            // This is just done to reserve space in the destination
            dst.put_slice(&buf[1..head_len]);

            // Shift the header forward
            for i in 0..huff_len {
                let src_i = idx + 1 + (huff_len - (i + 1));
                let dst_i = idx + head_len + (huff_len - (i + 1));
                dst[dst_i] = dst[src_i];
            }

            // Copy in the head
            for i in 0..head_len {
                dst[idx + i] = buf[i];
            }
        }
    } else {
        // Write an empty string
        dst.put_u8(0);
    }
}

/// Encode an integer into the given destination buffer
fn encode_int<B: BufMut>(
    mut value: usize,   // The integer to encode
    prefix_bits: usize, // The number of bits in the prefix
    first_byte: u8,     // The base upon which to start encoding the int
    dst: &mut B,
) {
    if encode_int_one_byte(value, prefix_bits) {
        dst.put_u8(first_byte | value as u8);
        return;
    }

    let low = (1 << prefix_bits) - 1;

    value -= low;

    dst.put_u8(first_byte | low as u8);

    while value >= 128 {
        dst.put_u8(0b1000_0000 | value as u8);

        value >>= 7;
    }

    dst.put_u8(value as u8);
}

/// Returns true if the in the int can be fully encoded in the first byte.
fn encode_int_one_byte(value: usize, prefix_bits: usize) -> bool {
    value < (1 << prefix_bits) - 1
}

fn position(buf: &BytesMut) -> usize {
    buf.len()
}

#[cfg(test)]
mod test {
    use super::*;
    use http::*;

    // PARLEY PATCH (send header table size): a table of 0 bytes announces itself once,
    // indexes nothing and holds nothing, whatever the peer's settings allow later.
    #[test]
    fn a_send_table_of_zero_indexes_nothing_and_holds_nothing() {
        let mut encoder = Encoder::default();
        encoder.set_max_allowed_size(0);
        let first = encode(
            &mut encoder,
            vec![header("content-type", "text/event-stream")],
        );
        assert_eq!(
            first[0], 0x20,
            "a dynamic table size update to 0 comes first"
        );
        assert_eq!(encoder.table.len(), 0);
        assert_eq!(encoder.table.capacity(), 0, "no room taken for entries");
        encoder.update_max_size(65_536);
        let second = encode(
            &mut encoder,
            vec![header("content-type", "text/event-stream")],
        );
        assert_eq!(&first[1..], &second[..], "the same literal, no size update");
        assert_eq!(encoder.table.capacity(), 0);
    }

    #[test]
    fn test_encode_method_get() {
        let mut encoder = Encoder::default();
        let res = encode(&mut encoder, vec![method("GET")]);
        assert_eq!(*res, [0x80 | 2]);
        assert_eq!(encoder.table.len(), 0);
    }

    #[test]
    fn test_encode_method_post() {
        let mut encoder = Encoder::default();
        let res = encode(&mut encoder, vec![method("POST")]);
        assert_eq!(*res, [0x80 | 3]);
        assert_eq!(encoder.table.len(), 0);
    }

    #[test]
    fn test_encode_method_patch() {
        let mut encoder = Encoder::default();
        let res = encode(&mut encoder, vec![method("PATCH")]);

        assert_eq!(res[0], 0b01000000 | 2); // Incremental indexing w/ name pulled from table
        assert_eq!(res[1], 0x80 | 5); // header value w/ huffman coding

        assert_eq!("PATCH", huff_decode(&res[2..7]));
        assert_eq!(encoder.table.len(), 1);

        let res = encode(&mut encoder, vec![method("PATCH")]);

        assert_eq!(1 << 7 | 62, res[0]);
        assert_eq!(1, res.len());
    }

    #[test]
    fn test_encode_indexed_name_literal_value() {
        let mut encoder = Encoder::default();
        let res = encode(&mut encoder, vec![header("content-language", "foo")]);

        assert_eq!(res[0], 0b01000000 | 27); // Indexed name
        assert_eq!(res[1], 0x80 | 2); // header value w/ huffman coding

        assert_eq!("foo", huff_decode(&res[2..4]));

        // Same name, new value should still use incremental
        let res = encode(&mut encoder, vec![header("content-language", "bar")]);
        assert_eq!(res[0], 0b01000000 | 27); // Indexed name
        assert_eq!(res[1], 0x80 | 3); // header value w/ huffman coding
        assert_eq!("bar", huff_decode(&res[2..5]));
    }

    #[test]
    fn test_repeated_headers_are_indexed() {
        let mut encoder = Encoder::default();
        let res = encode(&mut encoder, vec![header("foo", "hello")]);

        assert_eq!(&[0b01000000, 0x80 | 2], &res[0..2]);
        assert_eq!("foo", huff_decode(&res[2..4]));
        assert_eq!(0x80 | 4, res[4]);
        assert_eq!("hello", huff_decode(&res[5..]));
        assert_eq!(9, res.len());

        assert_eq!(1, encoder.table.len());

        let res = encode(&mut encoder, vec![header("foo", "hello")]);
        assert_eq!([0x80 | 62], *res);

        assert_eq!(encoder.table.len(), 1);
    }

    #[test]
    fn test_evicting_headers() {
        let mut encoder = Encoder::default();

        // Fill the table
        for i in 0..64 {
            let key = format!("x-hello-world-{:02}", i);
            let res = encode(&mut encoder, vec![header(&key, &key)]);

            assert_eq!(&[0b01000000, 0x80 | 12], &res[0..2]);
            assert_eq!(key, huff_decode(&res[2..14]));
            assert_eq!(0x80 | 12, res[14]);
            assert_eq!(key, huff_decode(&res[15..]));
            assert_eq!(27, res.len());

            // Make sure the header can be found...
            let res = encode(&mut encoder, vec![header(&key, &key)]);

            // Only check that it is found
            assert_eq!(0x80, res[0] & 0x80);
        }

        assert_eq!(4096, encoder.table.size());
        assert_eq!(64, encoder.table.len());

        // Find existing headers
        for i in 0..64 {
            let key = format!("x-hello-world-{:02}", i);
            let res = encode(&mut encoder, vec![header(&key, &key)]);
            assert_eq!(0x80, res[0] & 0x80);
        }

        // Insert a new header
        let key = "x-hello-world-64";
        let res = encode(&mut encoder, vec![header(key, key)]);

        assert_eq!(&[0b01000000, 0x80 | 12], &res[0..2]);
        assert_eq!(key, huff_decode(&res[2..14]));
        assert_eq!(0x80 | 12, res[14]);
        assert_eq!(key, huff_decode(&res[15..]));
        assert_eq!(27, res.len());

        assert_eq!(64, encoder.table.len());

        // Now try encoding entries that should exist in the table
        for i in 1..65 {
            let key = format!("x-hello-world-{:02}", i);
            let res = encode(&mut encoder, vec![header(&key, &key)]);
            assert_eq!(0x80 | (61 + (65 - i)), res[0]);
        }
    }

    #[test]
    fn test_large_headers_are_not_indexed() {
        let mut encoder = Encoder::new(128, 0);
        let key = "hello-world-hello-world-HELLO-zzz";

        let res = encode(&mut encoder, vec![header(key, key)]);

        assert_eq!(&[0, 0x80 | 25], &res[..2]);

        assert_eq!(0, encoder.table.len());
        assert_eq!(0, encoder.table.size());
    }

    #[test]
    fn test_sensitive_headers_are_never_indexed() {
        use http::header::HeaderValue;

        let name = "my-password".parse().unwrap();
        let mut value = HeaderValue::from_bytes(b"12345").unwrap();
        value.set_sensitive(true);

        let header = Header::Field {
            name: Some(name),
            value,
        };

        // Now, try to encode the sensitive header

        let mut encoder = Encoder::default();
        let res = encode(&mut encoder, vec![header]);

        assert_eq!(&[0b10000, 0x80 | 8], &res[..2]);
        assert_eq!("my-password", huff_decode(&res[2..10]));
        assert_eq!(0x80 | 4, res[10]);
        assert_eq!("12345", huff_decode(&res[11..]));

        // Now, try to encode a sensitive header w/ a name in the static table
        let name = "authorization".parse().unwrap();
        let mut value = HeaderValue::from_bytes(b"12345").unwrap();
        value.set_sensitive(true);

        let header = Header::Field {
            name: Some(name),
            value,
        };

        let mut encoder = Encoder::default();
        let res = encode(&mut encoder, vec![header]);

        assert_eq!(&[0b11111, 8], &res[..2]);
        assert_eq!(0x80 | 4, res[2]);
        assert_eq!("12345", huff_decode(&res[3..]));

        // Using the name component of a previously indexed header (without
        // sensitive flag set)

        let _ = encode(
            &mut encoder,
            vec![self::header("my-password", "not-so-secret")],
        );

        let name = "my-password".parse().unwrap();
        let mut value = HeaderValue::from_bytes(b"12345").unwrap();
        value.set_sensitive(true);

        let header = Header::Field {
            name: Some(name),
            value,
        };
        let res = encode(&mut encoder, vec![header]);

        assert_eq!(&[0b11111, 47], &res[..2]);
        assert_eq!(0x80 | 4, res[2]);
        assert_eq!("12345", huff_decode(&res[3..]));
    }

    #[test]
    fn test_sensitive_exact_dynamic_match_is_never_indexed() {
        let mut encoder = Encoder::default();
        let public = || header("my-password", "same-value");
        let inserted = encode(&mut encoder, vec![public()]);
        assert_eq!(inserted[0], 0b0100_0000);
        assert_eq!(encoder.table.len(), 1);

        let mut value = http::HeaderValue::from_static("same-value");
        value.set_sensitive(true);
        let sensitive = Header::Field {
            name: Some("my-password".parse().unwrap()),
            value,
        };
        let res = encode(&mut encoder, vec![sensitive]);
        assert!(
            res.starts_with(&[0b0001_1111, 47]),
            "sensitive dynamic match must be a never-indexed literal: {res:?}"
        );
        assert_eq!(&encode(&mut encoder, vec![public()])[..], &[0xbe]);
        assert_eq!(encoder.table.len(), 1);
    }

    #[test]
    fn test_content_length_value_not_indexed() {
        let mut encoder = Encoder::default();
        let res = encode(&mut encoder, vec![header("content-length", "1234")]);

        assert_eq!(&[15, 13, 0x80 | 3], &res[0..3]);
        assert_eq!("1234", huff_decode(&res[3..]));
        assert_eq!(6, res.len());
    }

    // PARLEY PATCH (date not indexed): a date is sent as a literal with the static
    // table's name (index 33) and takes no entry.
    #[test]
    fn test_date_value_not_indexed() {
        let mut encoder = Encoder::default();
        let date = "Sat, 05 Dec 2026 17:56:00 GMT";
        let res = encode(&mut encoder, vec![header("date", date)]);
        assert_eq!(&[15, 18], &res[0..2]);
        assert_eq!(date, huff_decode(&res[3..]));
        assert_eq!(encoder.table.len(), 0);
        let again = encode(&mut encoder, vec![header("date", date)]);
        assert_eq!(res, again);
    }

    #[test]
    fn test_encoding_headers_with_same_name() {
        let mut encoder = Encoder::default();
        let name = "hello";

        // Encode first one
        let _ = encode(&mut encoder, vec![header(name, "one")]);

        // Encode second one
        let res = encode(&mut encoder, vec![header(name, "two")]);
        assert_eq!(&[0x40 | 62, 0x80 | 3], &res[0..2]);
        assert_eq!("two", huff_decode(&res[2..]));
        assert_eq!(5, res.len());

        // Encode the first one again
        let res = encode(&mut encoder, vec![header(name, "one")]);
        assert_eq!(&[0x80 | 63], &res[..]);

        // Now the second one
        let res = encode(&mut encoder, vec![header(name, "two")]);
        assert_eq!(&[0x80 | 62], &res[..]);
    }

    #[test]
    fn test_evicting_headers_when_multiple_of_same_name_are_in_table() {
        // The encoder only has space for 2 headers
        let mut encoder = Encoder::new(76, 0);

        let _ = encode(&mut encoder, vec![header("foo", "bar")]);
        assert_eq!(1, encoder.table.len());

        let _ = encode(&mut encoder, vec![header("bar", "foo")]);
        assert_eq!(2, encoder.table.len());

        // This will evict the first header, while still referencing the header
        // name
        let res = encode(&mut encoder, vec![header("foo", "baz")]);
        assert_eq!(&[0x40 | 63, 0, 0x80 | 3], &res[..3]);
        assert_eq!(2, encoder.table.len());

        // Try adding the same header again
        let res = encode(&mut encoder, vec![header("foo", "baz")]);
        assert_eq!(&[0x80 | 62], &res[..]);
        assert_eq!(2, encoder.table.len());
    }

    #[test]
    fn test_max_size_zero() {
        // Static table only
        let mut encoder = Encoder::new(0, 0);
        let res = encode(&mut encoder, vec![method("GET")]);
        assert_eq!(*res, [0x80 | 2]);
        assert_eq!(encoder.table.len(), 0);

        let res = encode(&mut encoder, vec![header("foo", "bar")]);
        assert_eq!(&[0, 0x80 | 2], &res[..2]);
        assert_eq!("foo", huff_decode(&res[2..4]));
        assert_eq!(0x80 | 3, res[4]);
        assert_eq!("bar", huff_decode(&res[5..8]));
        assert_eq!(0, encoder.table.len());

        // Encode a custom value
        let res = encode(&mut encoder, vec![header("transfer-encoding", "chunked")]);
        assert_eq!(&[15, 42, 0x80 | 6], &res[..3]);
        assert_eq!("chunked", huff_decode(&res[3..]));
    }

    #[test]
    fn test_update_max_size_combos() {
        let mut encoder = Encoder::default();
        assert!(encoder.size_update.is_none());
        assert_eq!(4096, encoder.table.max_size());

        encoder.update_max_size(4096); // Default size
        assert!(encoder.size_update.is_none());

        encoder.update_max_size(0);
        assert_eq!(Some(SizeUpdate::One(0)), encoder.size_update);

        encoder.update_max_size(100);
        assert_eq!(Some(SizeUpdate::Two(0, 100)), encoder.size_update);

        let mut encoder = Encoder::default();
        encoder.set_max_allowed_size(8000);
        encoder.update_max_size(8000);
        assert_eq!(Some(SizeUpdate::One(8000)), encoder.size_update);

        encoder.update_max_size(100);
        assert_eq!(Some(SizeUpdate::One(100)), encoder.size_update);

        encoder.update_max_size(8000);
        assert_eq!(Some(SizeUpdate::Two(100, 8000)), encoder.size_update);

        encoder.update_max_size(4000);
        assert_eq!(Some(SizeUpdate::Two(100, 4000)), encoder.size_update);

        encoder.update_max_size(50);
        assert_eq!(Some(SizeUpdate::One(50)), encoder.size_update);
    }

    #[test]
    fn test_resizing_table() {
        let mut encoder = Encoder::default();

        // Add a header
        let _ = encode(&mut encoder, vec![header("foo", "bar")]);

        encoder.update_max_size(1);
        assert_eq!(1, encoder.table.len());

        let res = encode(&mut encoder, vec![method("GET")]);
        assert_eq!(&[32 | 1, 0x80 | 2], &res[..]);
        assert_eq!(0, encoder.table.len());

        let res = encode(&mut encoder, vec![header("foo", "bar")]);
        assert_eq!(0, res[0]);

        encoder.update_max_size(100);
        let res = encode(&mut encoder, vec![header("foo", "bar")]);
        assert_eq!(&[32 | 31, 69, 64], &res[..3]);

        encoder.update_max_size(0);
        let res = encode(&mut encoder, vec![header("foo", "bar")]);
        assert_eq!(&[32, 0], &res[..2]);
    }

    #[test]
    fn test_decreasing_table_size_without_eviction() {
        let mut encoder = Encoder::default();

        // Add a header
        let _ = encode(&mut encoder, vec![header("foo", "bar")]);

        encoder.update_max_size(100);
        assert_eq!(1, encoder.table.len());

        let res = encode(&mut encoder, vec![header("foo", "bar")]);
        assert_eq!(&[32 | 31, 69, 0x80 | 62], &res[..]);
    }

    #[test]
    fn test_nameless_header() {
        let mut encoder = Encoder::default();

        let res = encode(
            &mut encoder,
            vec![
                Header::Field {
                    name: Some("hello".parse().unwrap()),
                    value: HeaderValue::from_bytes(b"world").unwrap(),
                },
                Header::Field {
                    name: None,
                    value: HeaderValue::from_bytes(b"zomg").unwrap(),
                },
            ],
        );

        assert_eq!(&[0x40, 0x80 | 4], &res[0..2]);
        assert_eq!("hello", huff_decode(&res[2..6]));
        assert_eq!(0x80 | 4, res[6]);
        assert_eq!("world", huff_decode(&res[7..11]));

        // Next is not indexed
        assert_eq!(&[15, 47, 0x80 | 3], &res[11..14]);
        assert_eq!("zomg", huff_decode(&res[14..]));
    }

    #[test]
    fn test_large_size_update() {
        let mut encoder = Encoder::default();
        encoder.set_max_allowed_size(usize::MAX);

        encoder.update_max_size(1912930560);
        assert_eq!(Some(SizeUpdate::One(1912930560)), encoder.size_update);

        let mut dst = BytesMut::with_capacity(6);
        encoder.encode_size_updates(&mut dst);
        assert_eq!([63, 225, 129, 148, 144, 7], &dst[..]);
    }

    #[test]
    fn test_large_size_update_is_capped() {
        let mut encoder = Encoder::new(0, 0);

        encoder.update_max_size(1912930560);
        // PARLEY PATCH (the encoder's state in 32-bit counts): a `u32` update.
        assert_eq!(
            Some(SizeUpdate::One(DEFAULT_MAX_ALLOWED_SIZE as u32)),
            encoder.size_update
        );

        let mut dst = BytesMut::with_capacity(3);
        encoder.encode_size_updates(&mut dst);
        assert_eq!([63, 225, 31], &dst[..]);
        assert_eq!(DEFAULT_MAX_ALLOWED_SIZE, encoder.table.max_size());
    }

    // PARLEY PATCH (compact encoder table, no header block buffer kept): the encoder
    // inline in every connection is its table (a buffer and four counts) and its two
    // settings; 0.4.21's was 152 bytes (its table 88, an always-empty buffer 32).
    #[test]
    fn parley_the_encoder_is_its_table_and_its_settings() {
        assert!(
            std::mem::size_of::<Encoder>() <= 88,
            "{}",
            std::mem::size_of::<Encoder>()
        );
    }

    // PARLEY PATCH (compact encoder table): the headers of a few responses (eight
    // distinct ones, as an SSE session's connect, stream and join over HTTP/2) take
    // their bytes and four more each; h2 0.4.21 held 768 bytes of slots, 384 of
    // index and the values' own allocations for them.
    #[test]
    fn parley_the_table_holds_its_entries_bytes() {
        let mut encoder = Encoder::default();
        let responses = [
            vec![
                header("content-type", "application/json"),
                header("vary", "accept-encoding"),
                header(
                    "vary",
                    "origin, access-control-request-method, access-control-request-headers",
                ),
                header("access-control-allow-credentials", "true"),
                header("access-control-expose-headers", "x-parley-cursor"),
            ],
            vec![
                header("content-type", "text/event-stream"),
                header("cache-control", "no-cache, no-transform"),
                header("x-accel-buffering", "no"),
                header(
                    "vary",
                    "origin, access-control-request-method, access-control-request-headers",
                ),
            ],
        ];
        let mut distinct = std::collections::HashSet::new();
        for h in responses.iter().flatten() {
            if let Header::Field { name, value } = h {
                distinct.insert((name.clone().unwrap(), value.clone()));
            }
        }
        let entries = distinct.len();
        let bytes: usize = distinct
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len())
            .sum();
        for r in &responses {
            encode(&mut encoder, r.clone());
        }
        assert_eq!(encoder.table.len(), entries);
        assert!(
            encoder.table.capacity() <= (bytes + 4 * entries) * 5 / 4 + 64,
            "{} bytes of room for {} bytes in {} entries",
            encoder.table.capacity(),
            bytes,
            entries
        );
        // The second time, every header is an index.
        let again = encode(&mut encoder, responses[1].clone());
        assert_eq!(again.len(), 4);
        assert!(again.iter().all(|b| b & 0x80 != 0));
    }

    // PARLEY PATCH (compact encoder table, values per name): a header whose value
    // changes with every response (a cursor) has four entries, then is a literal with
    // an indexed name; the headers that repeat stay indexed, and a decoder reads every
    // header block back.
    #[test]
    fn parley_a_header_whose_value_keeps_changing_takes_four_entries_and_decodes() {
        use crate::hpack::Decoder;
        use std::io::Cursor;
        use std::ops::ControlFlow;

        let mut encoder = Encoder::default();
        let mut decoder = Decoder::new(4096);
        for i in 0..2_000u32 {
            let block = vec![
                header("content-type", "application/json"),
                header("x-parley-cursor", &i.to_string()),
                header("vary", "accept-encoding"),
            ];
            let mut expect: Vec<Header> =
                block.iter().map(|h| h.clone().reify().unwrap()).collect();
            let mut buf = encode(&mut encoder, block);
            decoder
                .decode(&mut Cursor::new(&mut buf), |h| {
                    assert_eq!(h, expect.remove(0));
                    ControlFlow::Continue(())
                })
                .expect("decodes");
            assert!(expect.is_empty());
            if i >= 4 {
                // content-type and vary indexed; the cursor's name indexed (two
                // bytes), its value a literal (at most three Huffman-coded digits and
                // their length).
                assert!(buf.len() <= 1 + 2 + 1 + 3 + 1, "{}: {:?}", i, &buf[..]);
            }
        }
        assert_eq!(encoder.table.len(), 2 + 4);
        assert!(
            encoder.table.capacity() <= 256,
            "{} bytes of room",
            encoder.table.capacity()
        );
        // A size update to 0 gives everything back.
        encoder.update_max_size(0);
        encode(&mut encoder, vec![header("vary", "accept-encoding")]);
        assert_eq!(encoder.table.len(), 0);
        assert_eq!(encoder.table.capacity(), 0);
    }

    #[test]
    #[ignore]
    fn test_evicted_overflow() {
        // Not sure what the best way to do this is.
    }

    // PARLEY PATCH (shared table bytes): encoders that index the same headers hold one
    // copy of their tables' bytes; one that indexes another header copies the bytes
    // back first, and what it encodes still decodes. The copy goes with its last table.
    #[test]
    fn parley_encoders_that_index_the_same_headers_share_their_table() {
        use crate::hpack::Decoder;
        use std::ops::ControlFlow;
        use std::sync::Arc;

        let response = || {
            vec![
                header("content-type", "text/event-stream"),
                header("x-parley-shared-encoder", "one copy"),
            ]
        };
        let mut a = Encoder::default();
        let mut b = Encoder::default();
        let mut da = Decoder::new(4096);
        let decoded = |de: &mut Decoder, mut buf: BytesMut| {
            let mut got = vec![];
            de.decode(&mut std::io::Cursor::new(&mut buf), |h| {
                got.push((h.name().as_slice().to_vec(), h.value_slice().to_vec()));
                ControlFlow::Continue(())
            })
            .unwrap();
            got
        };
        let want = |hs: Vec<Header<Option<HeaderName>>>| -> Vec<(Vec<u8>, Vec<u8>)> {
            hs.into_iter()
                .map(|h| {
                    let h = h.reify().unwrap();
                    (h.name().as_slice().to_vec(), h.value_slice().to_vec())
                })
                .collect()
        };
        let first = encode(&mut a, response());
        encode(&mut b, response());
        assert_eq!(decoded(&mut da, first), want(response()));
        let (sa, sb) = (a.table.shared().unwrap(), b.table.shared().unwrap());
        assert!(Arc::ptr_eq(sa, sb));
        let old = sa.to_vec();
        // Indexed: nothing changes, nothing is copied.
        let again = encode(&mut a, response());
        assert_eq!(decoded(&mut da, again), want(response()));
        assert!(Arc::ptr_eq(
            a.table.shared().unwrap(),
            b.table.shared().unwrap()
        ));
        // Another header: `a` copies its bytes out, adds it, and shares the new bytes.
        let more = || vec![header("x-parley-shared-encoder", "another value")];
        let third = encode(&mut a, more());
        assert_eq!(decoded(&mut da, third), want(more()));
        let (sa, sb) = (a.table.shared().unwrap(), b.table.shared().unwrap());
        assert!(!Arc::ptr_eq(sa, sb));
        assert_eq!(a.table.len(), 3);
        assert_eq!(&sb[..], &old[..]);
        // All three by index, from the table `a` shares.
        let all = || {
            let mut hs = response();
            hs.extend(more());
            hs
        };
        let fourth = encode(&mut a, all());
        assert!(fourth.len() <= 4, "three indexed headers: {fourth:?}");
        assert_eq!(decoded(&mut da, fourth), want(all()));
        let new = a.table.shared().unwrap().to_vec();
        drop(a);
        assert!(!super::super::pool::global_holds(&new));
        assert!(super::super::pool::global_holds(&old));
        drop(b);
        assert!(!super::super::pool::global_holds(&old));
    }

    // PARLEY PATCH (the encoder's state in 32-bit counts): the encoder is 56 bytes (88
    // with `usize` counts: every HTTP/2 connection holds one), a larger allowed size
    // than `MAX_TABLE_SIZE` is taken as it, and a large table indexes, evicts and
    // announces its size as before.
    #[test]
    fn parley_the_encoder_holds_32_bit_counts() {
        let size = std::mem::size_of::<Encoder>();
        assert!(size <= 56, "Encoder: {size} bytes (88 before)");

        let mut encoder = Encoder::default();
        encoder.set_max_allowed_size(usize::MAX);
        assert_eq!(encoder.max_allowed_size as usize, MAX_TABLE_SIZE);
        encoder.update_max_size(usize::MAX);
        assert_eq!(
            Some(SizeUpdate::One(MAX_TABLE_SIZE as u32)),
            encoder.size_update
        );
        // (h2's decoder reads size updates up to 2^28: a table of 1 MiB, announced.)
        encoder.update_max_size(1 << 20);
        assert_eq!(Some(SizeUpdate::One(1 << 20)), encoder.size_update);
        let mut dst = BytesMut::new();
        let headers = [
            header("x-one", "1"),
            header("x-two", "2"),
            header("x-one", "1"),
        ];
        encoder.encode(headers.iter().cloned(), &mut dst);
        assert_eq!(encoder.table.max_size(), 1 << 20);
        assert_eq!(encoder.table.len(), 2);
        assert_eq!(encoder.table.size(), 2 * (32 + 5 + 1));
        let mut de = crate::hpack::Decoder::new(4096);
        de.queue_size_update(1 << 20);
        let mut got = Vec::new();
        de.decode(&mut std::io::Cursor::new(&mut dst), |h| {
            got.push(h);
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(got.len(), 3);

        // Down to a small table: a new entry evicts the oldest that no longer fits.
        encoder.update_max_size(100);
        let mut dst = BytesMut::new();
        encoder.encode(std::iter::once(header("x-three", "3")), &mut dst);
        assert_eq!(encoder.table.max_size(), 100);
        assert_eq!(encoder.table.len(), 2);
        assert_eq!(encoder.table.size(), (32 + 5 + 1) + (32 + 7 + 1));
    }

    // PARLEY PATCH (shared table bytes): a table evicted to nothing lets the shared copy
    // go; one resized to 0 keeps nothing.
    #[test]
    fn parley_an_emptied_encoder_table_holds_no_shared_copy() {
        let mut e = Encoder::default();
        encode(
            &mut e,
            vec![header("x-parley-emptied", "a value long enough")],
        );
        let bytes = e.table.shared().unwrap().to_vec();
        assert!(super::super::pool::global_holds(&bytes));
        e.update_max_size(0);
        encode(&mut e, vec![]);
        assert_eq!((e.table.len(), e.table.capacity()), (0, 0));
        assert!(e.table.shared().is_none());
        assert!(!super::super::pool::global_holds(&bytes));
    }

    fn encode(e: &mut Encoder, hdrs: Vec<Header<Option<HeaderName>>>) -> BytesMut {
        let mut dst = BytesMut::with_capacity(1024);
        e.encode(hdrs, &mut dst);
        dst
    }

    fn method(s: &str) -> Header<Option<HeaderName>> {
        Header::Method(Method::from_bytes(s.as_bytes()).unwrap())
    }

    fn header(name: &str, val: &str) -> Header<Option<HeaderName>> {
        let name = HeaderName::from_bytes(name.as_bytes()).unwrap();
        let value = HeaderValue::from_bytes(val.as_bytes()).unwrap();

        Header::Field {
            name: Some(name),
            value,
        }
    }

    fn huff_decode(src: &[u8]) -> BytesMut {
        let mut buf = BytesMut::new();
        huffman::decode(src, &mut buf).unwrap()
    }
}
