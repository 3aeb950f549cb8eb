//! The raw-TCP framer (`taskd::rpc::tcp::Framer`). Input: one byte choosing the size limit,
//! one byte seeding how the stream is split, then the stream. The framer must never panic,
//! must hold at most the limit once it asks for more input, and must find the same frames
//! whether the stream arrives whole, one byte at a time, or in pseudo-random pieces.
#![no_main]

use libfuzzer_sys::fuzz_target;
use taskd::rpc::tcp::{Frame, Framer};

/// Feeds `pieces` in order, taking every frame after each, then ends the input.
fn run<'a>(max: usize, pieces: impl IntoIterator<Item = &'a [u8]>) -> Vec<Frame> {
    let mut framer = Framer::new(max);
    let mut frames = Vec::new();
    for piece in pieces {
        framer.push(piece);
        while let Some(frame) = framer.next_frame(false) {
            frames.push(frame);
        }
        assert!(
            framer.buffered() <= max,
            "{} bytes held over a {max}-byte limit",
            framer.buffered()
        );
    }
    while let Some(frame) = framer.next_frame(true) {
        frames.push(frame);
    }
    assert_eq!(framer.buffered(), 0, "input left over after the end");
    frames
}

/// Splits `stream` into pieces of 1 to 32 bytes, chosen by a xorshift generator.
fn pieces(stream: &[u8], seed: u8) -> Vec<&[u8]> {
    let mut state = (0x9E37_79B9u32 ^ u32::from(seed).wrapping_mul(0x0101_0101)) | 1;
    let mut out = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let n = (state % 32 + 1) as usize;
        let (piece, tail) = rest.split_at(n.min(rest.len()));
        out.push(piece);
        rest = tail;
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let [limit, seed, stream @ ..] = data else { return };
    // Small limits make the too-large paths common; 1..=1021 bytes.
    let max = 1 + usize::from(*limit) * 4;

    let whole = run(max, [stream]);
    for frame in &whole {
        if let Frame::Value(value) = frame {
            assert!(value.len() <= max, "a {}-byte value passed a {max}-byte limit", value.len());
            assert!(
                serde_json::from_slice::<Box<serde_json::value::RawValue>>(value).is_ok(),
                "a value that is not JSON: {:?}",
                value.escape_ascii().to_string()
            );
        }
    }
    assert_eq!(run(max, stream.chunks(1)), whole, "byte-at-a-time frames differ");
    assert_eq!(run(max, pieces(stream, *seed)), whole, "frames differ for seed {seed}");
});
