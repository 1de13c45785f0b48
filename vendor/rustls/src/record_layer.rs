use alloc::boxed::Box;
use core::cmp::min;

use zeroize::Zeroize;

use crate::crypto::cipher::{
    AeadKey, InboundOpaqueMessage, Iv, MessageDecrypter, MessageEncrypter, Tls13AeadAlgorithm,
};
use crate::idle_keys;
use crate::error::Error;
use crate::log::trace;
use crate::msgs::message::{InboundPlainMessage, OutboundOpaqueMessage, OutboundPlainMessage};

#[derive(PartialEq)]
enum DirectionState {
    /// No keying material.
    Invalid,

    /// Keying material present, but not yet in use.
    Prepared,

    /// Keying material in use.
    Active,
}

/// Record layer that tracks decryption and encryption keys.
pub(crate) struct RecordLayer {
    message_encrypter: Box<dyn MessageEncrypter>,
    message_decrypter: Box<dyn MessageDecrypter>,
    write_seq_max: u64,
    write_seq: u64,
    read_seq: u64,
    has_decrypted: bool,
    encrypt_state: DirectionState,
    decrypt_state: DirectionState,

    // Message encrypted with other keys may be encountered, so failures
    // should be swallowed by the caller.  This struct tracks the amount
    // of message size this is allowed for.
    // PARLEY PATCH: a `u32` (the most early data a server accepts is one), which packs
    // beside the flags above: 8 B less in every connection.
    trial_decryption_len: Option<u32>,

    // PARLEY PATCH: what each direction's TLS 1.3 key is expanded again from once given
    // back while the connection is idle (`idle_keys`); `None` where it is never given back.
    enc_rebuild: Option<Box<Rebuild>>,
    dec_rebuild: Option<Box<Rebuild>>,
}

/// PARLEY PATCH: a TLS 1.3 traffic key's bytes, kept so its expanded form (the
/// `MessageEncrypter` or `MessageDecrypter`) can be dropped while the connection is idle
/// and made again at the next record (`idle_keys`).
pub(crate) struct Rebuild {
    /// The algorithm, by a thin reference (the cipher suite's field), so that the box
    /// takes jemalloc's 64 B size class.
    alg: &'static &'static dyn Tls13AeadAlgorithm,
    /// The key's bytes (`key_len` of them used), zeroed on drop as `AeadKey`'s are.
    key: [u8; AeadKey::MAX_LEN],
    iv: Iv,
    /// The idle clock at the last use.
    last_use: u32,
    key_len: u8,
    /// What encryption adds to a payload (TLS 1.3: the content type and the tag), for
    /// `encrypted_len` while the encrypter is given back.
    overhead: u8,
    /// Whether the last use came after the key had been unused for `idle_keys::after()`.
    after_gap: bool,
    /// Whether the expanded key is given back (the record layer holds an invalid one).
    released: bool,
}

impl Drop for Rebuild {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

impl Rebuild {
    /// A rebuild for a key of `alg`, if giving keys back is on.
    pub(crate) fn new(
        alg: &'static &'static dyn Tls13AeadAlgorithm,
        key: &AeadKey,
        iv: &Iv,
    ) -> Option<Box<Self>> {
        if idle_keys::after() == 0 || !alg.resumable() {
            return None;
        }
        Some(Box::new(Self::kept(alg, key, iv, idle_keys::now())))
    }

    /// The bytes of `key` and `iv` kept, last used at `now`.
    fn kept(alg: &'static &'static dyn Tls13AeadAlgorithm, key: &AeadKey, iv: &Iv, now: u32) -> Self {
        let mut bytes = [0u8; AeadKey::MAX_LEN];
        let used = key.as_ref();
        bytes[..used.len()].copy_from_slice(used);
        Self {
            alg,
            key: bytes,
            iv: iv.copy_iv(),
            last_use: now,
            key_len: used.len() as u8,
            overhead: 0,
            after_gap: false,
            released: false,
        }
    }

    /// The kept key, for expanding it again.
    fn key(&self) -> AeadKey {
        AeadKey::from(self.key).with_length(usize::from(self.key_len))
    }

    fn touch(&mut self, now: u32, after: u32) {
        self.after_gap = after != 0 && now.wrapping_sub(self.last_use) >= after;
        self.last_use = now;
    }

    /// Whether the expanded key may go: the connection is quiet now, and the key was not
    /// used for `after`, or its last use came after such a gap.
    fn idle(&self, now: u32, after: u32) -> bool {
        !self.released && after != 0 && (self.after_gap || now.wrapping_sub(self.last_use) >= after)
    }
}

impl RecordLayer {
    /// Create new record layer with no keys.
    pub(crate) fn new() -> Self {
        Self {
            message_encrypter: <dyn MessageEncrypter>::invalid(),
            message_decrypter: <dyn MessageDecrypter>::invalid(),
            write_seq_max: 0,
            write_seq: 0,
            read_seq: 0,
            has_decrypted: false,
            encrypt_state: DirectionState::Invalid,
            decrypt_state: DirectionState::Invalid,
            trial_decryption_len: None,
            enc_rebuild: None,
            dec_rebuild: None,
        }
    }

    /// PARLEY PATCH: give back each expanded TLS 1.3 key that is idle (`idle_keys`).
    /// Called when the connection is quiet: its writes are all out, or a read found
    /// nothing.
    pub(crate) fn release_idle_keys(&mut self) {
        if self.enc_rebuild.is_none() && self.dec_rebuild.is_none() {
            return;
        }
        self.release_idle_keys_at(idle_keys::now(), idle_keys::after());
    }

    fn release_idle_keys_at(&mut self, now: u32, after: u32) {
        if let Some(rebuild) = self.enc_rebuild.as_mut() {
            if rebuild.idle(now, after) {
                self.message_encrypter = <dyn MessageEncrypter>::invalid();
                rebuild.released = true;
                idle_keys::count_release();
            }
        }
        if let Some(rebuild) = self.dec_rebuild.as_mut() {
            if rebuild.idle(now, after) {
                self.message_decrypter = <dyn MessageDecrypter>::invalid();
                rebuild.released = true;
                idle_keys::count_release();
            }
        }
    }

    /// PARLEY PATCH: the encrypter expanded again if it was given back; its use noted.
    fn encrypter_in_use(&mut self) {
        if let Some(rebuild) = self.enc_rebuild.as_mut() {
            rebuild.touch(idle_keys::now(), idle_keys::after());
            if rebuild.released {
                self.message_encrypter = rebuild
                    .alg
                    .resumed_encrypter(rebuild.key(), rebuild.iv.copy_iv());
                rebuild.released = false;
                idle_keys::count_expansion();
            }
        }
    }

    /// PARLEY PATCH: the decrypter expanded again if it was given back; its use noted.
    fn decrypter_in_use(&mut self) {
        if let Some(rebuild) = self.dec_rebuild.as_mut() {
            rebuild.touch(idle_keys::now(), idle_keys::after());
            if rebuild.released {
                self.message_decrypter = rebuild
                    .alg
                    .decrypter(rebuild.key(), rebuild.iv.copy_iv());
                rebuild.released = false;
                idle_keys::count_expansion();
            }
        }
    }

    /// Decrypt a TLS message.
    ///
    /// `encr` is a decoded message allegedly received from the peer.
    /// If it can be decrypted, its decryption is returned.  Otherwise,
    /// an error is returned.
    pub(crate) fn decrypt_incoming<'a>(
        &mut self,
        encr: InboundOpaqueMessage<'a>,
    ) -> Result<Option<Decrypted<'a>>, Error> {
        if self.decrypt_state != DirectionState::Active {
            return Ok(Some(Decrypted {
                want_close_before_decrypt: false,
                plaintext: encr.into_plain_message(),
            }));
        }

        // Set to `true` if the peer appears to getting close to encrypting
        // too many messages with this key.
        //
        // Perhaps if we send an alert well before their counter wraps, a
        // buggy peer won't make a terrible mistake here?
        //
        // Note that there's no reason to refuse to decrypt: the security
        // failure has already happened.
        let want_close_before_decrypt = self.read_seq == SEQ_SOFT_LIMIT;

        let encrypted_len = encr.payload.len();
        self.decrypter_in_use();
        match self
            .message_decrypter
            .decrypt(encr, self.read_seq)
        {
            Ok(plaintext) => {
                self.read_seq += 1;
                if !self.has_decrypted {
                    self.has_decrypted = true;
                }
                Ok(Some(Decrypted {
                    want_close_before_decrypt,
                    plaintext,
                }))
            }
            Err(Error::DecryptError) if self.doing_trial_decryption(encrypted_len) => {
                trace!("Dropping undecryptable message after aborted early_data");
                Ok(None)
            }
            Err(err) => Err(err),
        }
    }

    /// Encrypt a TLS message.
    ///
    /// `plain` is a TLS message we'd like to send.  This function
    /// panics if the requisite keying material hasn't been established yet.
    pub(crate) fn encrypt_outgoing(
        &mut self,
        plain: OutboundPlainMessage<'_>,
    ) -> OutboundOpaqueMessage {
        debug_assert!(self.encrypt_state == DirectionState::Active);
        assert!(self.next_pre_encrypt_action() != PreEncryptAction::Refuse);
        let seq = self.write_seq;
        self.write_seq += 1;
        self.encrypter_in_use();
        self.message_encrypter
            .encrypt(plain, seq)
            .unwrap()
    }

    /// Prepare to use the given `MessageEncrypter` for future message encryption.
    /// It is not used until you call `start_encrypting`.
    pub(crate) fn prepare_message_encrypter(
        &mut self,
        cipher: Box<dyn MessageEncrypter>,
        max_messages: u64,
    ) {
        self.message_encrypter = cipher;
        self.enc_rebuild = None;
        self.write_seq = 0;
        self.write_seq_max = min(SEQ_SOFT_LIMIT, max_messages);
        self.encrypt_state = DirectionState::Prepared;
    }

    /// Prepare to use the given `MessageDecrypter` for future message decryption.
    /// It is not used until you call `start_decrypting`.
    pub(crate) fn prepare_message_decrypter(&mut self, cipher: Box<dyn MessageDecrypter>) {
        self.message_decrypter = cipher;
        self.dec_rebuild = None;
        self.read_seq = 0;
        self.decrypt_state = DirectionState::Prepared;
    }

    /// Start using the `MessageEncrypter` previously provided to the previous
    /// call to `prepare_message_encrypter`.
    pub(crate) fn start_encrypting(&mut self) {
        debug_assert!(self.encrypt_state == DirectionState::Prepared);
        self.encrypt_state = DirectionState::Active;
    }

    /// Start using the `MessageDecrypter` previously provided to the previous
    /// call to `prepare_message_decrypter`.
    pub(crate) fn start_decrypting(&mut self) {
        debug_assert!(self.decrypt_state == DirectionState::Prepared);
        self.decrypt_state = DirectionState::Active;
    }

    /// Set and start using the given `MessageEncrypter` for future outgoing
    /// message encryption.
    pub(crate) fn set_message_encrypter(
        &mut self,
        cipher: Box<dyn MessageEncrypter>,
        max_messages: u64,
    ) {
        self.prepare_message_encrypter(cipher, max_messages);
        self.start_encrypting();
    }

    /// PARLEY PATCH: `set_message_encrypter` for a TLS 1.3 key that may be given back
    /// while idle (`rebuild` holds its bytes; `None`: never given back).
    pub(crate) fn set_message_encrypter_tls13(
        &mut self,
        cipher: Box<dyn MessageEncrypter>,
        max_messages: u64,
        rebuild: Option<Box<Rebuild>>,
    ) {
        self.set_message_encrypter(cipher, max_messages);
        if let Some(mut rebuild) = rebuild {
            // An overhead beyond a byte (no TLS 1.3 AEAD's) keeps its key expanded.
            if let Ok(overhead) = u8::try_from(
                self.message_encrypter
                    .encrypted_payload_len(0),
            ) {
                rebuild.overhead = overhead;
                self.enc_rebuild = Some(rebuild);
            }
        }
    }

    /// PARLEY PATCH: `set_message_decrypter` for a TLS 1.3 key that may be given back
    /// while idle (`rebuild` holds its bytes; `None`: never given back).
    pub(crate) fn set_message_decrypter_tls13(
        &mut self,
        cipher: Box<dyn MessageDecrypter>,
        rebuild: Option<Box<Rebuild>>,
    ) {
        self.set_message_decrypter(cipher);
        self.dec_rebuild = rebuild;
    }

    /// Set and start using the given `MessageDecrypter` for future incoming
    /// message decryption.
    pub(crate) fn set_message_decrypter(&mut self, cipher: Box<dyn MessageDecrypter>) {
        self.prepare_message_decrypter(cipher);
        self.start_decrypting();
        self.trial_decryption_len = None;
    }

    /// Set and start using the given `MessageDecrypter` for future incoming
    /// message decryption, and enable "trial decryption" mode for when TLS1.3
    /// 0-RTT is attempted but rejected by the server.
    pub(crate) fn set_message_decrypter_with_trial_decryption(
        &mut self,
        cipher: Box<dyn MessageDecrypter>,
        max_length: usize,
    ) {
        self.prepare_message_decrypter(cipher);
        self.start_decrypting();
        // PARLEY PATCH: a longer limit than a `u32` holds is none the protocol allows; it
        // is cut to one.
        self.trial_decryption_len = Some(u32::try_from(max_length).unwrap_or(u32::MAX));
    }

    pub(crate) fn finish_trial_decryption(&mut self) {
        self.trial_decryption_len = None;
    }

    pub(crate) fn next_pre_encrypt_action(&self) -> PreEncryptAction {
        self.pre_encrypt_action(0)
    }

    /// Return a remedial action when we are near to encrypting too many messages.
    ///
    /// `add` is added to the current sequence number.  `add` as `0` means
    /// "the next message processed by `encrypt_outgoing`"
    pub(crate) fn pre_encrypt_action(&self, add: u64) -> PreEncryptAction {
        match self.write_seq.saturating_add(add) {
            SEQ_HARD_LIMIT.. => PreEncryptAction::Refuse,
            v if v >= self.write_seq_max => PreEncryptAction::RefreshOrClose,
            _ => PreEncryptAction::Nothing,
        }
    }

    pub(crate) fn is_encrypting(&self) -> bool {
        self.encrypt_state == DirectionState::Active
    }

    /// Return true if we have ever decrypted a message. This is used in place
    /// of checking the read_seq since that will be reset on key updates.
    pub(crate) fn has_decrypted(&self) -> bool {
        self.has_decrypted
    }

    pub(crate) fn write_seq(&self) -> u64 {
        self.write_seq
    }

    pub(crate) fn read_seq(&self) -> u64 {
        self.read_seq
    }

    pub(crate) fn encrypted_len(&self, payload_len: usize) -> usize {
        // PARLEY PATCH: a given-back encrypter's overhead was noted when it was set.
        if let Some(rebuild) = self.enc_rebuild.as_ref() {
            if rebuild.released {
                return payload_len + usize::from(rebuild.overhead);
            }
        }
        self.message_encrypter
            .encrypted_payload_len(payload_len)
    }

    fn doing_trial_decryption(&mut self, requested: usize) -> bool {
        // PARLEY PATCH: the budget is a `u32` (see the field); a request past one is over.
        match self
            .trial_decryption_len
            .zip(u32::try_from(requested).ok())
            .and_then(|(value, requested)| value.checked_sub(requested))
        {
            Some(remaining) => {
                self.trial_decryption_len = Some(remaining);
                true
            }
            _ => false,
        }
    }
}

/// Result of decryption.
#[derive(Debug)]
pub(crate) struct Decrypted<'a> {
    /// Whether the peer appears to be getting close to encrypting too many messages with this key.
    pub(crate) want_close_before_decrypt: bool,
    /// The decrypted message.
    pub(crate) plaintext: InboundPlainMessage<'a>,
}

#[derive(Debug, Eq, PartialEq)]
pub(crate) enum PreEncryptAction {
    /// No action is needed before calling `encrypt_outgoing`
    Nothing,

    /// A `key_update` request should be sent ASAP.
    ///
    /// If that is not possible (for example, the connection is TLS1.2), a `close_notify`
    /// alert should be sent instead.
    RefreshOrClose,

    /// Do not call `encrypt_outgoing` further, it will panic rather than
    /// over-use the key.
    Refuse,
}

const SEQ_SOFT_LIMIT: u64 = 0xffff_ffff_ffff_0000u64;
const SEQ_HARD_LIMIT: u64 = 0xffff_ffff_ffff_fffeu64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_encrypt_action_checks_limits() {
        let action = |write_seq_max, write_seq, add| {
            let mut record_layer = RecordLayer::new();
            record_layer.write_seq_max = write_seq_max;
            record_layer.write_seq = write_seq;
            record_layer.pre_encrypt_action(add)
        };

        assert_eq!(action(10, 8, 1), PreEncryptAction::Nothing);
        assert_eq!(action(10, 8, 2), PreEncryptAction::RefreshOrClose);
        assert_eq!(action(10, 11, 0), PreEncryptAction::RefreshOrClose);
        assert_eq!(
            action(SEQ_SOFT_LIMIT, SEQ_HARD_LIMIT - 1, 0),
            PreEncryptAction::RefreshOrClose
        );
        assert_eq!(
            action(SEQ_SOFT_LIMIT, SEQ_HARD_LIMIT - 1, 1),
            PreEncryptAction::Refuse
        );
    }

    #[test]
    fn test_has_decrypted() {
        use crate::{ContentType, ProtocolVersion};

        struct PassThroughDecrypter;
        impl MessageDecrypter for PassThroughDecrypter {
            fn decrypt<'a>(
                &mut self,
                m: InboundOpaqueMessage<'a>,
                _: u64,
            ) -> Result<InboundPlainMessage<'a>, Error> {
                Ok(m.into_plain_message())
            }
        }

        // A record layer starts out invalid, having never decrypted.
        let mut record_layer = RecordLayer::new();
        assert!(matches!(
            record_layer.decrypt_state,
            DirectionState::Invalid
        ));
        assert_eq!(record_layer.read_seq, 0);
        assert!(!record_layer.has_decrypted());

        // Preparing the record layer should update the decrypt state, but shouldn't affect whether it
        // has decrypted.
        record_layer.prepare_message_decrypter(Box::new(PassThroughDecrypter));
        assert!(matches!(
            record_layer.decrypt_state,
            DirectionState::Prepared
        ));
        assert_eq!(record_layer.read_seq, 0);
        assert!(!record_layer.has_decrypted());

        // Starting decryption should update the decrypt state, but not affect whether it has decrypted.
        record_layer.start_decrypting();
        assert!(matches!(record_layer.decrypt_state, DirectionState::Active));
        assert_eq!(record_layer.read_seq, 0);
        assert!(!record_layer.has_decrypted());

        // Decrypting a message should update the read_seq and track that we have now performed
        // a decryption.
        record_layer
            .decrypt_incoming(InboundOpaqueMessage::new(
                ContentType::Handshake,
                ProtocolVersion::TLSv1_2,
                &mut [0xC0, 0xFF, 0xEE],
            ))
            .unwrap();
        assert!(matches!(record_layer.decrypt_state, DirectionState::Active));
        assert_eq!(record_layer.read_seq, 1);
        assert!(record_layer.has_decrypted());

        // Resetting the record layer message decrypter (as if a key update occurred) should reset
        // the read_seq number, but not our knowledge of whether we have decrypted previously.
        record_layer.set_message_decrypter(Box::new(PassThroughDecrypter));
        assert!(matches!(record_layer.decrypt_state, DirectionState::Active));
        assert_eq!(record_layer.read_seq, 0);
        assert!(record_layer.has_decrypted());
    }
}

// PARLEY PATCH: change 5, traffic keys given back while idle (`idle_keys`).
#[cfg(test)]
#[macro_rules_attribute::apply(test_for_each_provider)]
mod parley_idle_keys_tests {
    use std::vec::Vec;

    use super::*;
    use crate::enums::{ContentType, ProtocolVersion};
    use crate::msgs::message::OutboundChunks;

    fn alg() -> &'static &'static dyn Tls13AeadAlgorithm {
        &provider::cipher_suite::TLS13_AES_128_GCM_SHA256
            .tls13()
            .unwrap()
            .aead_alg
    }

    fn key() -> (AeadKey, Iv) {
        (
            AeadKey::from([7u8; AeadKey::MAX_LEN]).with_length(16),
            Iv::from([9u8; 12]),
        )
    }

    fn rebuild() -> Box<Rebuild> {
        let (key, iv) = key();
        Box::new(Rebuild::kept(alg(), &key, &iv, 0))
    }

    /// The box takes jemalloc's 64 B size class (it was 88 B, in the 96 B one).
    #[test]
    fn rebuild_fits_64_bytes() {
        let size = size_of::<Rebuild>();
        assert!(size <= 64, "{size}");
    }

    /// A sender and a receiver whose keys may be given back, and a sender whose keys never
    /// are.
    fn layers() -> (RecordLayer, RecordLayer, RecordLayer) {
        let (mut sender, mut receiver, mut reference) =
            (RecordLayer::new(), RecordLayer::new(), RecordLayer::new());
        let (k, iv) = key();
        sender.set_message_encrypter_tls13(
            alg().encrypter(key().0, iv.copy_iv()),
            u64::MAX,
            Some(rebuild()),
        );
        receiver.set_message_decrypter_tls13(alg().decrypter(key().0, iv.copy_iv()), Some(rebuild()));
        reference.set_message_encrypter(alg().encrypter(k, iv), u64::MAX);
        (sender, receiver, reference)
    }

    fn seal(layer: &mut RecordLayer, text: &[u8]) -> Vec<u8> {
        layer
            .encrypt_outgoing(OutboundPlainMessage {
                typ: ContentType::ApplicationData,
                version: ProtocolVersion::TLSv1_2,
                payload: OutboundChunks::Single(text),
            })
            .payload
            .as_ref()
            .to_vec()
    }

    fn open(layer: &mut RecordLayer, mut record: Vec<u8>) -> Vec<u8> {
        let plain = layer
            .decrypt_incoming(InboundOpaqueMessage::new(
                ContentType::ApplicationData,
                ProtocolVersion::TLSv1_2,
                &mut record,
            ))
            .unwrap()
            .unwrap()
            .plaintext;
        assert_eq!(plain.typ, ContentType::ApplicationData);
        plain.payload.to_vec()
    }

    #[test]
    fn keys_given_back_when_idle_and_expanded_again_with_the_same_records() {
        let (mut sender, mut receiver, mut reference) = layers();
        let len = sender.encrypted_len(5);
        for round in 0..4u8 {
            let text = [b'a' + round; 5];
            // Not idle yet: the keys were used at the clock's time.
            let now = sender.enc_rebuild.as_ref().unwrap().last_use;
            sender.release_idle_keys_at(now, 5);
            assert!(!sender.enc_rebuild.as_ref().unwrap().released);
            // Five ticks later both are idle and go.
            sender.release_idle_keys_at(now + 5, 5);
            receiver.release_idle_keys_at(now + 5, 5);
            assert!(sender.enc_rebuild.as_ref().unwrap().released);
            assert!(receiver.dec_rebuild.as_ref().unwrap().released);
            assert_eq!(sender.encrypted_len(5), len);
            // The next record expands them again: byte for byte what a sender that kept
            // its key sends, at the next sequence number, and so do the records after it
            // (aws-lc's TLS 1.3 sealing key would refuse them out of its own order).
            for _ in 0..3 {
                let record = seal(&mut sender, &text);
                assert!(!sender.enc_rebuild.as_ref().unwrap().released);
                assert_eq!(record, seal(&mut reference, &text));
                assert_eq!(record.len(), len);
                assert_eq!(open(&mut receiver, record), text);
                assert!(!receiver.dec_rebuild.as_ref().unwrap().released);
            }
            assert_eq!(sender.write_seq(), 3 * (u64::from(round) + 1));
            assert_eq!(receiver.read_seq(), 3 * (u64::from(round) + 1));
        }
    }

    #[test]
    fn a_key_used_after_a_gap_goes_at_once_and_a_busy_one_stays() {
        let (mut sender, _, _) = layers();
        let rebuild = sender.enc_rebuild.as_mut().unwrap();
        // Used every tick: never idle.
        for now in 1..20 {
            rebuild.touch(now, 5);
            assert!(!rebuild.idle(now, 5));
        }
        // A heartbeat after a 25-tick silence: idle as soon as the connection is quiet.
        rebuild.touch(44, 5);
        assert!(rebuild.idle(44, 5));
        // Off: never idle.
        assert!(!rebuild.idle(1000, 0));
    }

    #[test]
    fn keys_set_the_usual_way_are_never_given_back() {
        let (_, _, mut reference) = layers();
        reference.release_idle_keys_at(1000, 5);
        assert!(reference.enc_rebuild.is_none());
        let (k, iv) = key();
        let mut receiver = RecordLayer::new();
        receiver.set_message_decrypter_tls13(alg().decrypter(key().0, iv.copy_iv()), Some(rebuild()));
        // A key update installs a key the usual way: its rebuild goes with the old key.
        receiver.set_message_decrypter(alg().decrypter(k, iv));
        assert!(receiver.dec_rebuild.is_none());
    }

    #[test]
    fn off_unless_the_application_turns_it_on() {
        // No test in this crate calls `idle_keys::release_after`.
        let (k, iv) = key();
        assert!(Rebuild::new(alg(), &k, &iv).is_none());
    }
}
