//! The protobuf codec every service's generated code uses: prost's, whose
//! encoder starts from a 1 KiB buffer instead of tonic's 8 KiB. A call's
//! encode buffer lives as long as its response stream, so on a gateway
//! holding many idle subscriptions the default costs 8 KiB each; the buffer
//! still grows to fit any message. Decoding keeps tonic's defaults.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// First buffer of a call's encoder.
pub const BUFFER_BYTES: usize = 1024;
/// Encoded bytes a stream gathers before handing them to the transport
/// (tonic's default).
pub const YIELD_BYTES: usize = 32 * 1024;

#[derive(Debug, Clone)]
pub struct LeanCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER_BYTES, YIELD_BYTES))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::default())
    }
}
