//! Ed448 keys and RFC 8032 pure Ed448 over streams.
//!
//! ed448-goldilocks signs and verifies messages held in memory. A package can be gigabytes,
//! so this module runs the same RFC 8032 steps with the message fed in pieces: signing hashes
//! it twice (`r = SHAKE256(dom4 || prefix || M)`, then `k = SHAKE256(dom4 || R || A || M)`),
//! verifying once. The curve arithmetic, the scalar reduction and the point encodings are the
//! library's; the unit tests check every result against the library's own `sign_raw` and
//! `verify_raw`, and the integration tests against `openssl pkeyutl`.
//!
//! `R = [r]B` goes through [`mul_base`], a fixed-base comb over a table of multiples of the
//! generator built once from the library's own point additions: 111 additions and constant-time
//! table scans instead of a generic scalar multiplication, about three times faster, checked
//! against `EdwardsPoint::GENERATOR * r` in the tests.

use std::io::{self, Read};
use std::path::Path;

use ed448_goldilocks::shake::Shake256;
use ed448_goldilocks::shake::digest::{ExtendableOutput as _, Update as _, XofReader as _};
use ed448_goldilocks::subtle::ConstantTimeEq as _;
use ed448_goldilocks::{
    CompressedEdwardsY, EdwardsPoint, EdwardsScalar, SigningKey, VerifyingKey,
    WideEdwardsScalarBytes,
};
use pkcs8::der::Decode as _;
use pkcs8::{DecodePrivateKey as _, DecodePublicKey as _, EncodePublicKey as _};
use sha2::Digest as _;
use zeroize::{Zeroize as _, Zeroizing};

/// Length of a seed, a public key and each half of a signature.
pub const LEN: usize = 57;
/// Length of a signature.
pub const SIGNATURE_LEN: usize = 2 * LEN;
/// `dom4(0, "")`: pure Ed448, empty context.
const DOM4: &[u8] = b"SigEd448\x00\x00";
/// Bytes read per step.
pub const CHUNK: usize = 256 * 1024;

/// Errors with keys and signatures.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// Not a usable PEM key.
    #[error("{0}")]
    Format(String),
    /// The key file may be read by group or others.
    #[error("{0} must not be readable by group or others (chmod 600)")]
    Mode(String),
}

/// An Ed448 private key with what signing needs precomputed. The scalar and the nonce
/// prefix are zeroed when it is dropped (the library zeroes its own key).
pub struct Ed448Key {
    key: SigningKey,
    scalar: EdwardsScalar,
    prefix: [u8; LEN],
    public: [u8; LEN],
    keyid: String,
    public_table: std::sync::OnceLock<Box<WideTable>>,
}

impl Drop for Ed448Key {
    fn drop(&mut self) {
        self.scalar.zeroize();
        self.prefix.zeroize();
    }
}

/// A signature made by [`Ed448Key::sign_stream`], with what the audit records.
#[derive(Debug, Clone, Copy)]
pub struct StreamSignature {
    /// The signature, `R || S`.
    pub signature: [u8; SIGNATURE_LEN],
    /// SHA-256 of the content both passes read.
    pub sha256: [u8; 32],
    /// Its length.
    pub len: u64,
}

/// The SHA-256 of one pass over the message (inline, or on another thread).
pub trait PassDigest {
    /// Takes the next piece.
    fn update(&mut self, piece: &[u8]);
    /// The digest of every piece.
    ///
    /// # Errors
    /// The digest could not be computed (its thread failed).
    fn finish(self) -> io::Result<[u8; 32]>;
}

impl PassDigest for sha2::Sha256 {
    fn update(&mut self, piece: &[u8]) {
        sha2::Digest::update(self, piece);
    }

    fn finish(self) -> io::Result<[u8; 32]> {
        Ok(self.finalize().into())
    }
}

/// The error of a signature refused because the two passes read different content.
pub fn changed() -> io::Error {
    io::Error::other("the content changed while it was being signed; nothing was signed")
}

impl std::fmt::Debug for Ed448Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ed448Key")
            .field("keyid", &self.keyid)
            .finish_non_exhaustive()
    }
}

/// `keyid`: the first 16 hex digits of SHA-256 of the public key's DER (SubjectPublicKeyInfo).
pub fn keyid(key: &VerifyingKey) -> String {
    let der = key
        .to_public_key_der()
        .map(|d| d.as_bytes().to_vec())
        .unwrap_or_default();
    hex::encode(sha2::Sha256::digest(der))[..16].to_owned()
}

/// PEM SubjectPublicKeyInfo of a public key.
pub fn public_pem(key: &VerifyingKey) -> String {
    key.to_public_key_pem(pkcs8::LineEnding::LF)
        .unwrap_or_default()
}

/// Parses a PEM public key (SubjectPublicKeyInfo).
///
/// # Errors
/// Not an Ed448 public key.
pub fn parse_public_pem(pem: &str) -> Result<VerifyingKey, KeyError> {
    VerifyingKey::from_public_key_pem(pem.trim()).map_err(|e| KeyError::Format(e.to_string()))
}

impl Ed448Key {
    /// The key of a 57-byte seed.
    pub fn from_seed(seed: &[u8; LEN]) -> Self {
        // RFC 8032 5.2.5: the scalar from the first half of SHAKE256(seed, 114), pruned; the
        // prefix from the second half.
        let mut expanded = [0u8; 2 * LEN];
        Shake256::default()
            .chain(seed)
            .finalize_xof()
            .read(&mut expanded);
        let mut scalar_bytes = [0u8; LEN];
        scalar_bytes.copy_from_slice(&expanded[..LEN]);
        scalar_bytes[0] &= 0xFC;
        scalar_bytes[56] = 0;
        scalar_bytes[55] |= 0x80;
        let mut prefix = [0u8; LEN];
        prefix.copy_from_slice(&expanded[LEN..]);
        let scalar = EdwardsScalar::from_bytes_mod_order(&scalar_bytes.into());
        let key = SigningKey::try_from(&seed[..]).unwrap_or_else(|_| unreachable!("57 bytes"));
        let verifying = key.verifying_key();
        let public = verifying.to_bytes();
        let keyid = keyid(&verifying);
        expanded.zeroize();
        scalar_bytes.zeroize();
        Self {
            key,
            scalar,
            prefix,
            public,
            keyid,
            public_table: std::sync::OnceLock::new(),
        }
    }

    /// A new random key.
    pub fn generate() -> Self {
        use rand::RngCore as _;
        let mut seed = [0u8; LEN];
        rand::rngs::OsRng.fill_bytes(&mut seed);
        let key = Self::from_seed(&seed);
        seed.zeroize();
        key
    }

    /// Parses an unencrypted PKCS#8 PEM private key.
    ///
    /// # Errors
    /// Not an Ed448 PKCS#8 key.
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        let (label, der) =
            pkcs8::Document::from_pem(pem.trim()).map_err(|e| KeyError::Format(e.to_string()))?;
        if label != "PRIVATE KEY" {
            return Err(KeyError::Format(format!(
                "expected an unencrypted PKCS#8 \"PRIVATE KEY\", found {label:?}"
            )));
        }
        let info = pkcs8::PrivateKeyInfoRef::from_der(der.as_bytes())
            .map_err(|e| KeyError::Format(e.to_string()))?;
        if info.algorithm.oid != ed448_goldilocks::ALGORITHM_OID {
            return Err(KeyError::Format("not an Ed448 key".into()));
        }
        let key = SigningKey::from_pkcs8_der(der.as_bytes())
            .map_err(|e| KeyError::Format(e.to_string()))?;
        let seed = Zeroizing::new(<[u8; LEN]>::from(key.to_bytes()));
        Ok(Self::from_seed(&seed))
    }

    /// Reads a key file, refusing one that group or others may read.
    ///
    /// # Errors
    /// Unreadable, too open, or not an Ed448 key.
    pub fn read(path: &Path) -> Result<Self, KeyError> {
        Self::read_from(path, None)
    }

    /// [`Ed448Key::read`], except that a file inside `credentials` (systemd's
    /// `$CREDENTIALS_DIRECTORY`) may show group read: systemd grants the service user access
    /// there with an ACL, and `stat` reports the ACL mask in the group bits.
    ///
    /// # Errors
    /// As [`Ed448Key::read`].
    pub fn read_from(path: &Path, credentials: Option<&Path>) -> Result<Self, KeyError> {
        use std::os::unix::fs::PermissionsExt as _;
        let meta = std::fs::metadata(path)?;
        if !common::daemon::secret_mode_ok(path, meta.permissions().mode(), credentials) {
            return Err(KeyError::Mode(path.display().to_string()));
        }
        let text = Zeroizing::new(std::fs::read_to_string(path)?);
        Self::from_pem(&text)
    }

    /// PKCS#8 PEM of the private key (what `openssl pkey` reads).
    ///
    /// # Errors
    /// Encoding failure (none expected).
    pub fn to_pem(&self) -> Result<String, KeyError> {
        use pkcs8::EncodePrivateKey as _;
        let bytes = ed448::pkcs8::KeypairBytes {
            secret_key: self.key.to_bytes().into(),
            public_key: None,
        };
        let der = bytes
            .to_pkcs8_der()
            .map_err(|e| KeyError::Format(e.to_string()))?;
        der.to_pem("PRIVATE KEY", pkcs8::LineEnding::LF)
            .map(|pem| pem.to_string())
            .map_err(|e| KeyError::Format(e.to_string()))
    }

    /// The public key.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// The key id.
    pub fn keyid(&self) -> &str {
        &self.keyid
    }

    /// Signs the message `open` yields, reading it twice, and returns the signature with
    /// the SHA-256 and length of the content.
    ///
    /// Pure Ed448 derives the nonce `r` from a first pass over the message and the challenge
    /// `k` from a second. Should the two passes read different bytes, the result would share
    /// `R` with the signature of the first content but carry another `S`, and two such
    /// signatures reveal the private scalar. So each pass is digested with SHA-256 (the
    /// digest `digest` makes, fresh per pass) and nothing leaves this function unless both
    /// passes read the same bytes; then the signature is verified before it is returned.
    ///
    /// # Errors
    /// Reading failed, the passes read different content ([`changed`]), or the signature
    /// did not verify (a fault: it is not handed out).
    pub fn sign_stream<R: Read, D: PassDigest>(
        &self,
        mut open: impl FnMut() -> io::Result<R>,
        mut digest: impl FnMut() -> D,
    ) -> io::Result<StreamSignature> {
        let mut buf = Zeroizing::new(vec![0u8; CHUNK]);
        let mut first = Shake256::default().chain(DOM4).chain(self.prefix);
        let mut sha1 = digest();
        let len1 = feed(open()?, &mut buf, |piece| {
            first.update(piece);
            sha1.update(piece);
        });
        let len1 = match len1 {
            Ok(len) => len,
            Err(err) => {
                drop(sha1.finish());
                return Err(err);
            }
        };
        let sha1 = sha1.finish()?;
        let mut r = Zeroizing::new(wide_scalar(first));
        let big_r_point = mul_base(&r);
        let big_r = big_r_point.to_affine().compress();
        let mut second = Shake256::default()
            .chain(DOM4)
            .chain(big_r.as_bytes())
            .chain(self.public);
        let mut sha2 = digest();
        let len2 = feed(open()?, &mut buf, |piece| {
            second.update(piece);
            sha2.update(piece);
        });
        let len2 = match len2 {
            Ok(len) => len,
            Err(err) => {
                drop(sha2.finish());
                return Err(err);
            }
        };
        let sha2 = sha2.finish()?;
        if len1 != len2 || !bool::from(sha1.ct_eq(&sha2)) {
            r.zeroize();
            return Err(changed());
        }
        let k = wide_scalar(second);
        let s = Zeroizing::new(*r + k * self.scalar);
        let mut signature = [0u8; SIGNATURE_LEN];
        signature[..LEN].copy_from_slice(big_r.as_bytes());
        signature[LEN..].copy_from_slice(&s.to_bytes_rfc_8032());
        if !self.check(&signature, &k) {
            return Err(io::Error::other(
                "the signature did not verify; it was not handed out",
            ));
        }
        Ok(StreamSignature {
            signature,
            sha256: sha2,
            len: len2,
        })
    }

    /// Verifies a signature this key just made, given the challenge `k` of its second pass:
    /// `[S]B = R + [k]A`, with `R` and `S` decoded from the encoded signature, so a fault in
    /// the scalar arithmetic, the point arithmetic or the encoding is caught. All of it is
    /// public, so it runs in variable time over precomputed tables.
    fn check(&self, signature: &[u8; SIGNATURE_LEN], k: &EdwardsScalar) -> bool {
        let mut s_bytes = [0u8; LEN];
        s_bytes.copy_from_slice(&signature[LEN..]);
        let Some(s) =
            Option::<EdwardsScalar>::from(EdwardsScalar::from_canonical_bytes(&s_bytes.into()))
        else {
            return false;
        };
        let lhs = mul_wide(wide_base_table(), &s) - mul_wide(self.public_table(), k);
        lhs.to_affine().compress().as_bytes()[..] == signature[..LEN]
    }

    /// The wide comb table of this key's public point, built on first use.
    fn public_table(&self) -> &WideTable {
        self.public_table
            .get_or_init(|| wide_table(EdwardsPoint::GENERATOR * self.scalar))
    }

    /// Signs a message in memory (the library's own implementation).
    pub fn sign(&self, message: &[u8]) -> [u8; SIGNATURE_LEN] {
        self.key.sign_raw(message).to_bytes()
    }
}

/// Nibbles of a scalar (446 bits fit 112 of them).
const WINDOWS: usize = 112;

/// `TABLE[i][j] = (j + 1) * 16^i * B`.
fn base_table() -> &'static [[EdwardsPoint; 8]; WINDOWS] {
    static TABLE: std::sync::OnceLock<Box<[[EdwardsPoint; 8]; WINDOWS]>> =
        std::sync::OnceLock::new();
    TABLE.get_or_init(|| comb_table(EdwardsPoint::GENERATOR))
}

/// `TABLE[i][j] = (j + 1) * 16^i * point`.
fn comb_table(point: EdwardsPoint) -> Box<[[EdwardsPoint; 8]; WINDOWS]> {
    let mut table = Box::new([[EdwardsPoint::IDENTITY; 8]; WINDOWS]);
    let mut base = point;
    for row in table.iter_mut() {
        row[0] = base;
        for j in 1..8 {
            row[j] = row[j - 1] + base;
        }
        for _ in 0..4 {
            base = base.double();
        }
    }
    table
}

/// Rows of a wide comb table: signed radix-256 digits of a scalar below 2^446, plus a carry.
const WIDE_WINDOWS: usize = 57;

/// `TABLE[i][j] = (j + 1) * 256^i * P`, for j < 128: 57 rows of 128 points (1.6 MB). Used
/// only in variable time, for public scalars (verification), where it needs 57 additions
/// per multiplication instead of the narrow comb's 112.
type WideTable = [[EdwardsPoint; 128]; WIDE_WINDOWS];

fn wide_base_table() -> &'static WideTable {
    static TABLE: std::sync::OnceLock<Box<WideTable>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| wide_table(EdwardsPoint::GENERATOR))
}

fn wide_table(point: EdwardsPoint) -> Box<WideTable> {
    let mut table: Box<WideTable> = vec![[EdwardsPoint::IDENTITY; 128]; WIDE_WINDOWS]
        .into_boxed_slice()
        .try_into()
        .unwrap_or_else(|_| unreachable!("57 rows"));
    let mut base = point;
    for row in table.iter_mut() {
        row[0] = base;
        for j in 1..128 {
            row[j] = row[j - 1] + base;
        }
        for _ in 0..8 {
            base = base.double();
        }
    }
    table
}

/// `[scalar]P` over a wide comb table of `P`, in variable time: for public scalars only.
fn mul_wide(table: &WideTable, scalar: &EdwardsScalar) -> EdwardsPoint {
    let bytes = scalar.to_bytes_rfc_8032();
    let mut acc = EdwardsPoint::IDENTITY;
    let mut carry = 0i16;
    for (byte, row) in bytes.iter().zip(table.iter()) {
        let mut digit = i16::from(*byte) + carry;
        carry = 0;
        if digit >= 128 {
            digit -= 256;
            carry = 1;
        }
        match digit.cmp(&0) {
            std::cmp::Ordering::Greater => acc += row[digit.unsigned_abs() as usize - 1],
            std::cmp::Ordering::Less => acc -= row[digit.unsigned_abs() as usize - 1],
            std::cmp::Ordering::Equal => {}
        }
    }
    acc
}

/// `[scalar]P` over a comb table of `P`, in variable time: for public scalars only.
#[cfg(test)]
fn mul_vartime(table: &[[EdwardsPoint; 8]; WINDOWS], scalar: &EdwardsScalar) -> EdwardsPoint {
    let mut acc = EdwardsPoint::IDENTITY;
    for (digit, row) in signed_digits(scalar).iter().zip(table.iter()) {
        match digit.cmp(&0) {
            std::cmp::Ordering::Greater => acc += row[digit.unsigned_abs() as usize - 1],
            std::cmp::Ordering::Less => acc -= row[digit.unsigned_abs() as usize - 1],
            std::cmp::Ordering::Equal => {}
        }
    }
    acc
}

/// The scalar as 112 signed radix-16 digits in [-8, 8), least significant first.
fn signed_digits(scalar: &EdwardsScalar) -> [i8; WINDOWS] {
    let bytes = scalar.to_bytes_rfc_8032();
    let mut digits = [0i8; WINDOWS];
    for (i, digit) in digits.iter_mut().enumerate() {
        let byte = bytes[i / 2];
        *digit = if i % 2 == 0 { byte & 0x0F } else { byte >> 4 } as i8;
    }
    // Carry so every digit is in [-8, 8); a reduced scalar is below 2^446, so the top digit
    // (at most 3, plus a carry) stays in range.
    for i in 0..WINDOWS - 1 {
        let carry = (digits[i] + 8) >> 4;
        digits[i] -= carry << 4;
        digits[i + 1] += carry;
    }
    digits
}

/// `[scalar]B` by a fixed-base comb in constant time: each window scans all 8 entries of its
/// row, keeps the one for the digit's magnitude with a conditional select, and negates it
/// with a conditional select when the digit is negative.
pub fn mul_base(scalar: &EdwardsScalar) -> EdwardsPoint {
    use ed448_goldilocks::subtle::{Choice, ConditionallySelectable as _, ConstantTimeEq as _};
    let table = base_table();
    let mut acc = EdwardsPoint::IDENTITY;
    for (digit, row) in signed_digits(scalar).iter().zip(table.iter()) {
        let negative = (*digit as u8) >> 7;
        let magnitude = (*digit as u8 ^ 0u8.wrapping_sub(negative)).wrapping_add(negative);
        let mut pick = EdwardsPoint::IDENTITY;
        for (j, point) in row.iter().enumerate() {
            pick.conditional_assign(point, magnitude.ct_eq(&(j as u8 + 1)));
        }
        let negated = -pick;
        pick.conditional_assign(&negated, Choice::from(negative));
        acc += pick;
    }
    acc
}

fn feed(mut reader: impl Read, buf: &mut [u8], mut each: impl FnMut(&[u8])) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        let n = match reader.read(buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        };
        each(&buf[..n]);
        total += n as u64;
    }
}

fn wide_scalar(hasher: Shake256) -> EdwardsScalar {
    let mut bytes = WideEdwardsScalarBytes::default();
    hasher.finalize_xof().read(&mut bytes);
    EdwardsScalar::from_bytes_mod_order_wide(&bytes)
}

/// Verifies a pure Ed448 signature over a message fed in pieces, in one pass and bounded
/// memory (the JSON API's `/v1/verify` feeds it the request body as it arrives).
pub struct StreamVerifier {
    /// `None` when the signature or key cannot be valid whatever the message.
    parts: Option<(EdwardsPoint, EdwardsScalar, EdwardsPoint)>,
    hasher: Shake256,
}

impl std::fmt::Debug for StreamVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamVerifier").finish_non_exhaustive()
    }
}

impl StreamVerifier {
    /// Starts verifying `signature` with `key`.
    pub fn new(key: &VerifyingKey, signature: &[u8]) -> Self {
        let public: [u8; LEN] = key.to_bytes();
        let mut r_bytes = [0u8; LEN];
        let mut parts = None;
        if let Ok(signature) = <&[u8; SIGNATURE_LEN]>::try_from(signature) {
            r_bytes.copy_from_slice(&signature[..LEN]);
            let mut s_bytes = [0u8; LEN];
            s_bytes.copy_from_slice(&signature[LEN..]);
            let big_r = Option::<_>::from(CompressedEdwardsY(r_bytes).decompress());
            let s =
                Option::<EdwardsScalar>::from(EdwardsScalar::from_canonical_bytes(&s_bytes.into()));
            let a = Option::<_>::from(CompressedEdwardsY(public).decompress());
            if let (Some(big_r), Some(s), Some(a)) = (big_r, s, a) {
                parts = Some((
                    ed448_goldilocks::AffinePoint::to_edwards(&big_r),
                    s,
                    ed448_goldilocks::AffinePoint::to_edwards(&a),
                ));
            }
        }
        Self {
            parts,
            hasher: Shake256::default().chain(DOM4).chain(r_bytes).chain(public),
        }
    }

    /// Feeds the next piece of the message.
    pub fn update(&mut self, piece: &[u8]) {
        if self.parts.is_some() {
            self.hasher.update(piece);
        }
    }

    /// Whether the signature is valid for everything fed.
    pub fn finish(self) -> bool {
        let Some((big_r, s, a)) = self.parts else {
            return false;
        };
        let k = wide_scalar(self.hasher);
        // The library's checks and equation: R not the identity, S not zero, [S]B = R + [k]A.
        if big_r == EdwardsPoint::IDENTITY || s == EdwardsScalar::ZERO {
            return false;
        }
        mul_wide(wide_base_table(), &s) == big_r + a * k
    }
}

/// Verifies a pure Ed448 signature over the message `reader` yields, in one pass.
///
/// # Errors
/// Reading failed. A bad signature is `Ok(false)`.
pub fn verify_stream(key: &VerifyingKey, signature: &[u8], reader: impl Read) -> io::Result<bool> {
    let mut verifier = StreamVerifier::new(key, signature);
    let mut buf = vec![0u8; CHUNK];
    feed(reader, &mut buf, |piece| verifier.update(piece))?;
    Ok(verifier.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_matches_the_library() {
        for size in [
            0usize,
            1,
            56,
            57,
            1000,
            CHUNK - 1,
            CHUNK,
            CHUNK + 1,
            3 * CHUNK + 17,
        ] {
            let key = Ed448Key::generate();
            let message: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            let signed = key
                .sign_stream(|| Ok(std::io::Cursor::new(&message)), sha2::Sha256::new)
                .unwrap();
            let streamed = signed.signature;
            assert_eq!(signed.len, size as u64);
            assert_eq!(
                signed.sha256,
                <[u8; 32]>::from(sha2::Sha256::digest(&message))
            );
            assert_eq!(streamed, key.sign(&message), "size {size}");
            assert!(verify_stream(&key.verifying_key(), &streamed, &message[..]).unwrap());
            let library = ed448_goldilocks::Signature::try_from(&streamed[..]).unwrap();
            assert!(key.verifying_key().verify_raw(&library, &message).is_ok());
            let mut bad = streamed;
            bad[3] ^= 1;
            assert!(!verify_stream(&key.verifying_key(), &bad, &message[..]).unwrap());
            if size > 0 {
                let mut other = message.clone();
                other[size / 2] ^= 0x80;
                assert!(!verify_stream(&key.verifying_key(), &streamed, &other[..]).unwrap());
            }
        }
    }

    #[test]
    fn two_passes_over_different_content_sign_nothing() {
        let key = Ed448Key::generate();
        for (first, second) in [
            (&b"the same length A"[..], &b"the same length B"[..]),
            (&b"short"[..], &b"longer content"[..]),
        ] {
            let mut opened = 0;
            let result = key.sign_stream(
                || {
                    opened += 1;
                    Ok(if opened == 1 { first } else { second })
                },
                sha2::Sha256::default,
            );
            let err = result.expect_err("content that changed between passes is not signed");
            assert!(err.to_string().contains("changed"), "{err}");
        }
    }

    #[test]
    fn the_streaming_verifier_refuses_malformed_signatures() {
        let key = Ed448Key::generate();
        let public = key.verifying_key();
        for bad in [
            &[][..],
            &[0u8; SIGNATURE_LEN][..],
            &[0xFF; SIGNATURE_LEN][..],
        ] {
            let mut verifier = StreamVerifier::new(&public, bad);
            verifier.update(b"message");
            assert!(!verifier.finish());
        }
    }

    #[test]
    fn the_comb_matches_the_library() {
        use rand::RngCore as _;
        for round in 0..64 {
            let mut wide = [0u8; 114];
            rand::rngs::OsRng.fill_bytes(&mut wide);
            if round == 0 {
                wide = [0; 114];
            }
            let r = EdwardsScalar::from_bytes_mod_order_wide(&wide.into());
            assert_eq!(mul_base(&r), EdwardsPoint::GENERATOR * r, "round {round}");
            assert_eq!(
                mul_vartime(base_table(), &r),
                EdwardsPoint::GENERATOR * r,
                "round {round}"
            );
            assert_eq!(
                mul_wide(wide_base_table(), &r),
                EdwardsPoint::GENERATOR * r,
                "round {round}"
            );
        }
        let minus_one = EdwardsScalar::ZERO - EdwardsScalar::ONE;
        assert_eq!(mul_base(&minus_one), EdwardsPoint::GENERATOR * minus_one);
        assert_eq!(
            mul_wide(wide_base_table(), &minus_one),
            EdwardsPoint::GENERATOR * minus_one
        );
    }

    #[test]
    fn rfc8032_test_vector_one_octet() {
        // RFC 8032 7.4, "1 octet".
        let seed = hex::decode("c4eab05d357007c632f3dbb48489924d552b08fe0c353a0d4a1f00acda2c463afbea67c5e8d2877c5e3bc397a659949ef8021e954e0a12274e").unwrap();
        let key = Ed448Key::from_seed(&seed.try_into().unwrap());
        let signed = key
            .sign_stream(|| Ok(&[0x03u8][..]), sha2::Sha256::new)
            .unwrap();
        assert_eq!(
            hex::encode(signed.signature),
            "26b8f91727bd62897af15e41eb43c377efb9c610d48f2335cb0bd0087810f4352541b143c4b981b7e18f62de8ccdf633fc1bf037ab7cd779805e0dbcc0aae1cbcee1afb2e027df36bc04dcecbf154336c19f0af7e0a6472905e799f1953d2a0ff3348ab21aa4adafd1d234441cf807c03a00"
        );
    }

    #[test]
    fn pem_round_trip_keyid_and_mode() {
        let key = Ed448Key::generate();
        let pem = key.to_pem().unwrap();
        let back = Ed448Key::from_pem(&pem).unwrap();
        assert_eq!(back.keyid(), key.keyid());
        assert_eq!(key.keyid().len(), 16);
        let public = parse_public_pem(&public_pem(&key.verifying_key())).unwrap();
        assert_eq!(keyid(&public), key.keyid());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        std::fs::write(&path, &pem).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(Ed448Key::read(&path), Err(KeyError::Mode(_))));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(Ed448Key::read(&path).unwrap().keyid(), key.keyid());
        // In systemd's credentials directory the ACL mask shows as group read.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o440)).unwrap();
        assert!(matches!(Ed448Key::read(&path), Err(KeyError::Mode(_))));
        assert!(Ed448Key::read_from(&path, Some(dir.path())).is_ok());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
        assert!(Ed448Key::read_from(&path, Some(dir.path())).is_err());
        assert!(
            Ed448Key::from_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----")
                .is_err()
        );
    }
}
