use super::{pool, Header};

#[cfg(test)]
use std::sync::Arc;

use http::header;
use http::method::Method;

/// HPACK encoder table
///
/// PARLEY PATCH (compact encoder table): the entries are kept as their bytes, in
/// one buffer, oldest first: for each, the name's and the value's lengths (`u16`,
/// little-endian) and then the name and the value. h2 0.4.21 kept a `Slot` per entry
/// (the `Header`, its hash and a link to the previous entry of the same name: 96
/// bytes, in a `VecDeque` that grows by doubling) and a Robin Hood index of 24-byte
/// positions (8, then 16, ... for 6, 12, ... entries), and the entries' values kept
/// their own allocations alive: an HTTP/2 connection that had sent a few responses
/// (eight distinct headers) held ~1.2 KB of table for ~300 bytes of names and values,
/// and a table filled to its 4,096 bytes (~75 entries of unique values) ~12 KB.
/// A lookup is now a scan of the entries, newest last (a server's table holds the few
/// headers its responses repeat; at most 4,096 / 32 entries), comparing lengths
/// before bytes. What is indexed, and how each header is encoded, is unchanged.
#[derive(Debug)]
pub struct Table {
    /// The entries from `start` to the end, oldest first (see above).
    bytes: Buf,
    /// Where the oldest entry begins; the bytes before it are evicted entries, given
    /// back when the buffer needs room.
    ///
    /// PARLEY PATCH (the encoder's state in 32-bit counts): this and the three below
    /// are `u32`s (the table's sizes are at most `encoder::MAX_TABLE_SIZE`, 2 GiB: an
    /// entry is indexed only when its size is under three quarters of the table's, and
    /// the buffer, evicted bytes included, is at most ~1.25 times the live entries'
    /// bytes plus one entry).
    start: u32,
    /// How many entries there are.
    len: u32,
    // Size is in bytes (as RFC 7541 section 4.1 counts it)
    size: u32,
    max_size: u32,
}

/// PARLEY PATCH (shared table bytes): the table's buffer, its own while a header block
/// changes it, and at the end of each block that changed it (`Table::settle`) a copy
/// shared with every connection whose table holds the same bytes (`pool`): a server
/// sends the same few headers on most connections, so most of their tables are alike.
/// The next change copies the bytes back into a buffer of the table's own.
#[derive(Debug)]
enum Buf {
    Own(Vec<u8>),
    Shared(pool::Shared),
}

impl Buf {
    fn as_slice(&self) -> &[u8] {
        match self {
            Buf::Own(v) => v,
            Buf::Shared(s) => s.bytes(),
        }
    }
}

#[derive(Debug)]
pub enum Index {
    // The header is already fully indexed
    Indexed(usize, Header),

    // The name is indexed, but not the value
    Name(usize, Header),

    // The full header has been inserted into the table.
    Inserted(Header),

    // Only the value has been inserted (the index of the name, in the static
    // table or in the dynamic table before the insertion)
    InsertedValue(usize, Header),

    // The header is not indexed by this table
    NotIndexed(Header),
}

const DYN_OFFSET: usize = 62;

/// The bytes before an entry's name: its name's and its value's lengths.
const ENTRY_HEAD: usize = 4;

/// PARLEY PATCH (values per name): the most entries one name has in the table.
const MAX_VALUES_PER_NAME: usize = 4;

impl Table {
    pub fn new(max_size: usize, capacity: usize) -> Table {
        // PARLEY PATCH (compact encoder table): `capacity` counted entries; room for
        // that many of ~32 bytes each.
        Table {
            bytes: Buf::Own(Vec::with_capacity(capacity * 32)),
            start: 0,
            len: 0,
            size: 0,
            // PARLEY PATCH (the encoder's state in 32-bit counts)
            max_size: max_size.min(super::encoder::MAX_TABLE_SIZE) as u32,
        }
    }

    /// PARLEY PATCH (compact encoder table): the bytes the table holds room for.
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        match &self.bytes {
            Buf::Own(v) => v.capacity(),
            Buf::Shared(_) => self.bytes.as_slice().len(),
        }
    }

    /// PARLEY PATCH (shared table bytes): the pool's copy the table's bytes are, if so.
    #[cfg(test)]
    pub fn shared(&self) -> Option<&Arc<[u8]>> {
        match &self.bytes {
            Buf::Shared(s) => Some(s.arc()),
            Buf::Own(_) => None,
        }
    }

    /// PARLEY PATCH (shared table bytes): at the end of a header block, a table whose
    /// bytes changed in it takes the pool's copy of them, the same as other tables',
    /// and lets its own go. A table the pool does not take (under `pool::MIN_LEN`
    /// bytes, or its shard full) keeps its own, and is offered again after the next
    /// block.
    pub fn settle(&mut self) {
        let own = matches!(self.bytes, Buf::Own(_));
        if !own && self.start == 0 {
            return;
        }
        let entries = &self.bytes.as_slice()[self.start as usize..];
        if entries.is_empty() {
            return;
        }
        if let Some(shared) = pool::take_bytes(entries) {
            self.bytes = Buf::Shared(shared);
            self.start = 0;
        }
    }

    /// PARLEY PATCH (shared table bytes): the buffer as the table's own, copied out of
    /// the pool's (the entries from `start`, and room for `more` bytes) if shared.
    fn own(&mut self, more: usize) -> &mut Vec<u8> {
        if let Buf::Shared(_) = self.bytes {
            let entries = &self.bytes.as_slice()[self.start as usize..];
            let mut v = Vec::with_capacity(entries.len() + more);
            v.extend_from_slice(entries);
            self.bytes = Buf::Own(v);
            self.start = 0;
        }
        match &mut self.bytes {
            Buf::Own(v) => v,
            Buf::Shared(_) => unreachable!(),
        }
    }

    pub fn max_size(&self) -> usize {
        self.max_size as usize
    }

    /// Gets the header stored in the table
    pub fn resolve<'a>(&'a self, index: &'a Index) -> &'a Header {
        use self::Index::*;

        match *index {
            Indexed(_, ref h) => h,
            Name(_, ref h) => h,
            Inserted(ref h) => h,
            InsertedValue(_, ref h) => h,
            NotIndexed(ref h) => h,
        }
    }

    pub fn resolve_idx(&self, index: &Index) -> usize {
        use self::Index::*;

        match *index {
            Indexed(idx, ..) => idx,
            Name(idx, ..) => idx,
            // The entry just inserted is the newest.
            Inserted(_) => DYN_OFFSET,
            InsertedValue(..) => DYN_OFFSET,
            NotIndexed(_) => panic!("cannot resolve index"),
        }
    }

    /// Index the header in the HPACK table.
    pub fn index(&mut self, header: Header) -> Index {
        // Check the static table
        let statik = index_static(&header);

        // Don't index certain headers. This logic is borrowed from nghttp2.
        if header.skip_value_index() {
            // Right now, if this is true, the header name is always in the
            // static table. At some point in the future, this might not be true
            // and this logic will need to be updated.
            debug_assert!(statik.is_some(), "skip_value_index requires a static name",);
            return Index::new(statik, header);
        }

        // If the header is already indexed by the static table, return that
        if let Some((n, true)) = statik {
            return Index::Indexed(n, header);
        }

        // Don't index large headers
        if header.len() * 4 > self.max_size as usize * 3 {
            return Index::new(statik, header);
        }

        self.index_dynamic(header, statik)
    }

    fn index_dynamic(&mut self, header: Header, statik: Option<(usize, bool)>) -> Index {
        let (full, named, values) = {
            let name = header.name();
            let name = name.as_slice();
            let value = header.value_slice();
            self.find(name, value)
        };

        if let Some(i) = full {
            // A full match
            return Index::dynamic_match(i + DYN_OFFSET, header);
        }

        if header.is_sensitive() {
            // Never inserted; the name may still come from the dynamic table.
            return match named {
                Some(i) => Index::Name(i + DYN_OFFSET, header),
                None => Index::new(statik, header),
            };
        }

        // PARLEY PATCH (values per name): a name with MAX_VALUES_PER_NAME values in
        // the table gets no more; the header is a literal without indexing, its name
        // from the static table or the newest entry of that name. A header whose value
        // changes with every response (a cursor, a request id) so takes no more room and
        // evicts nothing: inserted, it filled the table with values that never came
        // again (~75 of them in 4,096 bytes), evicting the headers that do repeat,
        // which were then sent as literals again, and every lookup scanned them.
        if values >= MAX_VALUES_PER_NAME {
            return match (statik, named) {
                (Some(_), _) | (None, None) => Index::new(statik, header),
                (None, Some(i)) => Index::Name(i + DYN_OFFSET, header),
            };
        }

        // The name from the static table if it is there, else from the dynamic
        // table (its index before the insertion, which is what the decoder
        // resolves it against, RFC 7541 section 4.4).
        let name_idx = match statik {
            Some((n, _)) => Some(n),
            None => named.map(|i| i + DYN_OFFSET),
        };

        let inserted = {
            let name = header.name();
            self.insert(name.as_slice(), header.value_slice(), header.len())
        };

        if !inserted {
            return Index::new(statik, header);
        }

        match name_idx {
            Some(n) => Index::InsertedValue(n, header),
            None => Index::Inserted(header),
        }
    }

    /// The newest entry with this name and value, and the newest with this name and
    /// another value, as indexes into the dynamic table (0 the newest); and how many
    /// entries have this name.
    fn find(&self, name: &[u8], value: &[u8]) -> (Option<usize>, Option<usize>, usize) {
        let mut full = None;
        let mut named = None;
        let mut values = 0;
        let bytes = self.bytes.as_slice();
        let mut pos = self.start as usize;
        // The index of the entry at `pos`, plus one.
        let mut i = self.len as usize;

        while pos < bytes.len() {
            let name_len = u16::from_le_bytes([bytes[pos], bytes[pos + 1]]) as usize;
            let value_len = u16::from_le_bytes([bytes[pos + 2], bytes[pos + 3]]) as usize;
            let at = pos + ENTRY_HEAD;
            i -= 1;

            if name_len == name.len() && &bytes[at..at + name_len] == name {
                values += 1;
                let v = at + name_len;
                if value_len == value.len() && &bytes[v..v + value_len] == value {
                    full = Some(i);
                } else {
                    named = Some(i);
                }
            }

            pos = at + name_len + value_len;
        }

        (full, named, values)
    }

    /// Inserts an entry of RFC 7541 size `size`, evicting the oldest ones as needed;
    /// false (and nothing evicted) for a name or value too long to be recorded.
    fn insert(&mut self, name: &[u8], value: &[u8], size: usize) -> bool {
        if name.len() > u16::MAX as usize || value.len() > u16::MAX as usize {
            return false;
        }

        // PARLEY PATCH (the encoder's state in 32-bit counts): an indexed entry is under
        // three quarters of `max_size`, itself at most 2 GiB.
        self.size += size as u32;
        self.converge();

        let n = ENTRY_HEAD + name.len() + value.len();
        self.reserve(n);
        let bytes = self.own(n);
        bytes.extend_from_slice(&(name.len() as u16).to_le_bytes());
        bytes.extend_from_slice(&(value.len() as u16).to_le_bytes());
        bytes.extend_from_slice(name);
        bytes.extend_from_slice(value);
        self.len += 1;

        true
    }

    /// Room for `n` more bytes. A table that has not evicted grows by what is needed
    /// (a server's table mostly stops growing after its first responses); one that
    /// has evicted gives the evicted entries' bytes back first, and grows by what is
    /// needed plus a quarter of what is there, so that a full table whose entries
    /// keep changing moves its bytes once per several insertions, not per insertion.
    fn reserve(&mut self, n: usize) {
        // PARLEY PATCH (shared table bytes): a shared buffer is copied out with room
        // for `n` (and without the evicted entries).
        self.own(n);
        let Buf::Own(bytes) = &mut self.bytes else {
            unreachable!()
        };
        if bytes.capacity() - bytes.len() >= n {
            return;
        }

        let mut slack = 0;
        if self.start > 0 {
            bytes.drain(..self.start as usize);
            self.start = 0;

            if bytes.capacity() - bytes.len() >= n {
                return;
            }
            slack = bytes.len() / 4;
        }

        bytes.reserve_exact(n + slack);
    }

    pub fn resize(&mut self, size: usize) {
        // PARLEY PATCH (the encoder's state in 32-bit counts): the encoder passes at
        // most `MAX_TABLE_SIZE`.
        self.max_size = size.min(super::encoder::MAX_TABLE_SIZE) as u32;

        if size == 0 {
            // PARLEY PATCH (compact encoder table): nothing can be indexed, so
            // nothing is kept.
            self.size = 0;
            self.len = 0;
            self.start = 0;
            self.bytes = Buf::Own(Vec::new());
        } else {
            self.converge();
        }
    }

    fn converge(&mut self) {
        while self.size > self.max_size {
            self.evict();
        }
    }

    fn evict(&mut self) {
        debug_assert!(self.len > 0);

        let pos = self.start as usize;
        let bytes = self.bytes.as_slice();
        let name_len = u16::from_le_bytes([bytes[pos], bytes[pos + 1]]) as usize;
        let value_len = u16::from_le_bytes([bytes[pos + 2], bytes[pos + 3]]) as usize;

        // Update the size
        self.size -= (32 + name_len + value_len) as u32;
        self.start = (pos + ENTRY_HEAD + name_len + value_len) as u32;
        self.len -= 1;

        if self.len == 0 {
            match &mut self.bytes {
                Buf::Own(v) => v.clear(),
                // PARLEY PATCH (shared table bytes): the shared copy let go.
                Buf::Shared(_) => self.bytes = Buf::Own(Vec::new()),
            }
            self.start = 0;
        }
    }
}

#[cfg(test)]
impl Table {
    /// Returns the number of headers in the table
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Returns the table size
    pub fn size(&self) -> usize {
        self.size as usize
    }
}

impl Index {
    /// Index for a full match in the dynamic table.
    ///
    /// A sensitive header must not become an index reference: whether its
    /// value is already in the table depends on earlier, possibly
    /// attacker-influenced, headers, so a short index versus a literal would
    /// leak equality through the encoded length (RFC 7541 section 7.1).
    /// Reuse the name index and emit a never-indexed literal instead,
    /// leaving the table untouched. Static table entries hold no secrets,
    /// so static full matches stay indexed.
    fn dynamic_match(n: usize, header: Header) -> Index {
        if header.is_sensitive() {
            Index::Name(n, header)
        } else {
            Index::Indexed(n, header)
        }
    }

    fn new(v: Option<(usize, bool)>, e: Header) -> Index {
        match v {
            None => Index::NotIndexed(e),
            Some((n, true)) => Index::Indexed(n, e),
            Some((n, false)) => Index::Name(n, e),
        }
    }
}

/// Checks the static table for the header. If found, returns the index and a
/// boolean representing if the value matched as well.
fn index_static(header: &Header) -> Option<(usize, bool)> {
    match *header {
        Header::Field {
            ref name,
            ref value,
        } => match *name {
            header::ACCEPT_CHARSET => Some((15, false)),
            header::ACCEPT_ENCODING => {
                if value == "gzip, deflate" {
                    Some((16, true))
                } else {
                    Some((16, false))
                }
            }
            header::ACCEPT_LANGUAGE => Some((17, false)),
            header::ACCEPT_RANGES => Some((18, false)),
            header::ACCEPT => Some((19, false)),
            header::ACCESS_CONTROL_ALLOW_ORIGIN => Some((20, false)),
            header::AGE => Some((21, false)),
            header::ALLOW => Some((22, false)),
            header::AUTHORIZATION => Some((23, false)),
            header::CACHE_CONTROL => Some((24, false)),
            header::CONTENT_DISPOSITION => Some((25, false)),
            header::CONTENT_ENCODING => Some((26, false)),
            header::CONTENT_LANGUAGE => Some((27, false)),
            header::CONTENT_LENGTH => Some((28, false)),
            header::CONTENT_LOCATION => Some((29, false)),
            header::CONTENT_RANGE => Some((30, false)),
            header::CONTENT_TYPE => Some((31, false)),
            header::COOKIE => Some((32, false)),
            header::DATE => Some((33, false)),
            header::ETAG => Some((34, false)),
            header::EXPECT => Some((35, false)),
            header::EXPIRES => Some((36, false)),
            header::FROM => Some((37, false)),
            header::HOST => Some((38, false)),
            header::IF_MATCH => Some((39, false)),
            header::IF_MODIFIED_SINCE => Some((40, false)),
            header::IF_NONE_MATCH => Some((41, false)),
            header::IF_RANGE => Some((42, false)),
            header::IF_UNMODIFIED_SINCE => Some((43, false)),
            header::LAST_MODIFIED => Some((44, false)),
            header::LINK => Some((45, false)),
            header::LOCATION => Some((46, false)),
            header::MAX_FORWARDS => Some((47, false)),
            header::PROXY_AUTHENTICATE => Some((48, false)),
            header::PROXY_AUTHORIZATION => Some((49, false)),
            header::RANGE => Some((50, false)),
            header::REFERER => Some((51, false)),
            header::REFRESH => Some((52, false)),
            header::RETRY_AFTER => Some((53, false)),
            header::SERVER => Some((54, false)),
            header::SET_COOKIE => Some((55, false)),
            header::STRICT_TRANSPORT_SECURITY => Some((56, false)),
            header::TRANSFER_ENCODING => Some((57, false)),
            header::USER_AGENT => Some((58, false)),
            header::VARY => Some((59, false)),
            header::VIA => Some((60, false)),
            header::WWW_AUTHENTICATE => Some((61, false)),
            _ => None,
        },
        Header::Authority(_) => Some((1, false)),
        Header::Method(ref v) => match *v {
            Method::GET => Some((2, true)),
            Method::POST => Some((3, true)),
            _ => Some((2, false)),
        },
        Header::Scheme(ref v) => match &**v {
            "http" => Some((6, true)),
            "https" => Some((7, true)),
            _ => Some((6, false)),
        },
        Header::Path(ref v) => match &**v {
            "/" => Some((4, true)),
            "/index.html" => Some((5, true)),
            _ => Some((4, false)),
        },
        Header::Protocol(..) => None,
        Header::Status(ref v) => match u16::from(*v) {
            200 => Some((8, true)),
            204 => Some((9, true)),
            206 => Some((10, true)),
            304 => Some((11, true)),
            400 => Some((12, true)),
            404 => Some((13, true)),
            500 => Some((14, true)),
            _ => Some((8, false)),
        },
    }
}
