//! A webhook's answer body in each framing (JSON, NDJSON, SSE, plain text), split into chunks
//! where the fuzzer says, as the network would deliver it.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use teams_router::backend::Deltas;
use teams_router::backend::webhook::read_answer;

const CONTENT_TYPES: [&str; 5] = [
    "application/json",
    "application/x-ndjson",
    "text/event-stream",
    "text/plain; charset=utf-8",
    "application/octet-stream",
];

fuzz_target!(|data: &[u8]| {
    let Some((&head, body)) = data.split_first() else {
        return;
    };
    let content_type = CONTENT_TYPES[usize::from(head % 5)];
    let chunk_len = usize::from(head / 5).max(1);
    let chunks: Vec<Result<Bytes, std::io::Error>> = body
        .chunks(chunk_len)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let deltas = Deltas::unread();
    let _ = futures_executor::block_on(read_answer(
        content_type,
        futures_util::stream::iter(chunks),
        Some(&deltas),
    ));
});
