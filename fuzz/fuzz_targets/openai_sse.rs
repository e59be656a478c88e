//! A model's streamed Chat Completion (server-sent events), split into chunks where the fuzzer
//! says.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use teams_router::backend::Deltas;
use teams_router::backend::openai::read_completion;

fuzz_target!(|data: &[u8]| {
    let Some((&head, body)) = data.split_first() else {
        return;
    };
    let chunk_len = usize::from(head).max(1);
    let chunks: Vec<Result<Bytes, std::io::Error>> = body
        .chunks(chunk_len)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let deltas = Deltas::unread();
    let _ =
        futures_executor::block_on(read_completion(futures_util::stream::iter(chunks), &deltas));
});
