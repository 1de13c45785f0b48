mod decoder;
mod encoder;
pub(crate) mod header;
pub(crate) mod huffman;
// PARLEY PATCH (shared table bytes): one copy of the bytes HPACK tables hold alike.
mod pool;
mod table;

#[cfg(test)]
mod test;

pub use self::decoder::{Decoder, DecoderError, NeedMore};
pub use self::encoder::Encoder;
pub use self::header::{BytesStr, Header};
