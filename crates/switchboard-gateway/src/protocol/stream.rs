//! What the stream decoders of this module share.

use bytes::BytesMut;
use switchboard_core::framing::FramingError;
use tokio_util::codec::Decoder;

/// `Decoder::decode_eof` for protocols where every message is complete:
/// bytes left over when the stream ends are an error made by `truncated`
/// from their count, instead of tokio-util's generic i/o error.
pub(super) fn decode_eof<D: Decoder>(
    decoder: &mut D,
    src: &mut BytesMut,
    truncated: impl FnOnce(usize) -> D::Error,
) -> Result<Option<D::Item>, D::Error> {
    match decoder.decode(src)? {
        Some(item) => Ok(Some(item)),
        None if src.is_empty() => Ok(None),
        None => Err(truncated(src.len())),
    }
}

/// A `switchboard_core` framing error in a decoder's own terms: an over-long
/// message keeps its sizes; anything else (decoding reports nothing else
/// today) is passed on as an i/o error.
pub(super) fn framing_error<E: From<std::io::Error>>(
    e: FramingError,
    too_long: impl FnOnce(usize, usize) -> E,
) -> E {
    match e {
        FramingError::TooLong { len, max } => too_long(len, max),
        other => E::from(std::io::Error::other(other)),
    }
}
