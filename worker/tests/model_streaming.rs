//! The streaming model clients against a local server speaking each provider's SSE
//! wire format: deltas in order, tool calls reassembled from fragments, usage with
//! cached tokens, prompt-cache breakpoints, and streams that break, report an error,
//! go quiet or grow too large.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use nexo_worker::models::{
    ChatMessage, ChatModel, ChatRequest, ChatResponse, Deltas, LlmError, MAX_EVENT_BYTES,
    StreamError, ToolDefinition, Usage, from_spec,
};
use nexo_worker::secrets::Secrets;
use serde_json::{Value, json};
use support::{DEADLINE, FakeModel, FakeReply, TempDir, anthropic_events, openai_events, wait_for};
use tokio::sync::Notify;

/// What a call sent to its deltas sink, in order.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Text(String),
    Restart,
}

#[derive(Default)]
struct Recorder(Mutex<Vec<Seen>>);

impl Deltas for Recorder {
    fn text(&self, chunk: &str) {
        self.0.lock().unwrap().push(Seen::Text(chunk.to_owned()));
    }

    fn restart(&self) {
        self.0.lock().unwrap().push(Seen::Restart);
    }
}

impl Recorder {
    fn seen(&self) -> Vec<Seen> {
        self.0.lock().unwrap().clone()
    }

    /// The text pieces, in order (restarts left out).
    fn texts(&self) -> Vec<String> {
        self.seen()
            .into_iter()
            .filter_map(|seen| match seen {
                Seen::Text(text) => Some(text),
                Seen::Restart => None,
            })
            .collect()
    }
}

fn texts(pieces: &[&str]) -> Vec<Seen> {
    pieces.iter().map(|p| Seen::Text((*p).to_owned())).collect()
}

/// The production client of `provider` for `fake`, built from a spec as an agent's
/// model is (`extra` adds spec fields, such as `maxRetries`).
fn client(provider: &str, fake: &FakeModel, extra: Value) -> Arc<dyn ChatModel> {
    let mut spec = json!({
        "provider": provider,
        "model": "test-model",
        "baseUrl": fake.base_url,
        "apiKey": {"env": "CARGO_PKG_NAME"},
        "maxRetries": 0,
    });
    spec.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let spec = serde_json::from_value(spec).expect("a valid model spec");
    let dir = TempDir::new();
    from_spec(&spec, &Secrets::new(dir.path())).expect("the model builds")
}

fn request() -> ChatRequest {
    let tool = |name: &str| ToolDefinition {
        name: name.to_owned(),
        description: format!("the {name} tool"),
        parameters: json!({"type": "object", "properties": {}}),
    };
    ChatRequest {
        system: "Be brief.".to_owned(),
        messages: vec![ChatMessage::User("hi".to_owned())],
        tools: vec![tool("current_time"), tool("lookup")],
    }
}

async fn call(model: &dyn ChatModel, deltas: &Recorder) -> Result<ChatResponse, LlmError> {
    tokio::time::timeout(DEADLINE, model.complete(&request(), deltas))
        .await
        .expect("the call ends in time")
}

fn anthropic_usage(usage: Value) -> FakeReply {
    let mut reply = FakeReply::anthropic(json!([{"type": "text", "text": "cached answer"}]));
    reply.body["usage"] = usage;
    reply
}

/// A handler that answers `reply()`, except the first request, which gets
/// `first(reply())`: a first attempt that fails, then the answer.
fn failing_once(
    reply: impl Fn() -> FakeReply + Send + Sync + 'static,
    first: impl Fn(FakeReply) -> FakeReply + Send + Sync + 'static,
) -> impl Fn(&Value) -> FakeReply + Send + Sync + 'static {
    let attempts = std::sync::atomic::AtomicUsize::new(0);
    move |_| match attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
        0 => first(reply()),
        _ => reply(),
    }
}

/// Calls `provider` at `fake` allowing one retry: the answer and what the deltas saw.
async fn call_with_a_retry(provider: &str, fake: &FakeModel) -> (ChatResponse, Vec<Seen>) {
    let deltas = Recorder::default();
    let answer = call(&*client(provider, fake, json!({"maxRetries": 1})), &deltas)
        .await
        .unwrap();
    (answer, deltas.seen())
}

#[tokio::test]
async fn openai_text_deltas_arrive_in_order_and_join_to_the_answer() {
    let fake = FakeModel::openai(|_| FakeReply::text("the quick brown fox")).await;
    let deltas = Recorder::default();
    let answer = call(&*client("openai", &fake, json!({})), &deltas)
        .await
        .unwrap();
    assert_eq!(deltas.seen(), texts(&["the ", "quick ", "brown ", "fox"]));
    assert_eq!(deltas.texts().concat(), answer.text);
    assert_eq!(answer.text, "the quick brown fox");
    assert_eq!(answer.finish_reason.as_deref(), Some("stop"));
    let sent = fake.request(0);
    assert_eq!(sent["stream"], true);
    assert_eq!(sent["stream_options"]["include_usage"], true);
}

#[tokio::test]
async fn anthropic_text_deltas_arrive_in_order_and_join_to_the_answer() {
    let fake = FakeModel::anthropic(|_| {
        FakeReply::anthropic(json!([{"type": "text", "text": "the quick brown fox"}]))
    })
    .await;
    let deltas = Recorder::default();
    let answer = call(&*client("anthropic", &fake, json!({})), &deltas)
        .await
        .unwrap();
    assert_eq!(deltas.seen(), texts(&["the ", "quick ", "brown ", "fox"]));
    assert_eq!(deltas.texts().concat(), answer.text);
    assert_eq!(answer.finish_reason.as_deref(), Some("end_turn"));
    assert_eq!(fake.request(0)["stream"], true);
}

#[tokio::test]
async fn openai_tool_call_split_across_fragments_is_reassembled() {
    let arguments = json!({"city": "Zürich", "days": [1, 2, 3], "note": "a \"quoted\" word"});
    let expected = arguments.clone();
    let fake =
        FakeModel::openai(move |_| FakeReply::tool_call("call_7", "lookup", arguments.clone()))
            .await;
    let fragments = openai_events(&FakeReply::tool_call("call_7", "lookup", expected.clone()).body)
        .iter()
        .filter(|chunk| {
            chunk["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"] != ""
        })
        .count();
    assert!(fragments > 5, "the arguments come in {fragments} fragments");
    let answer = call(&*client("openai", &fake, json!({})), &Recorder::default())
        .await
        .unwrap();
    assert_eq!(answer.tool_calls.len(), 1);
    assert_eq!(answer.tool_calls[0].id, "call_7");
    assert_eq!(answer.tool_calls[0].name, "lookup");
    assert_eq!(answer.tool_calls[0].arguments, expected);
}

#[tokio::test]
async fn openai_fragments_of_two_tool_calls_interleaved_join_by_index() {
    let chunk = |delta: Value, finish: Value| json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
    let fragment = |index: u32, function: Value, id: Option<&str>| {
        let mut piece = json!({"index": index, "function": function});
        if let Some(id) = id {
            piece["id"] = json!(id);
            piece["type"] = json!("function");
        }
        chunk(json!({"tool_calls": [piece]}), Value::Null)
    };
    let events = vec![
        chunk(json!({"role": "assistant", "content": null}), Value::Null),
        fragment(
            0,
            json!({"name": "current_time", "arguments": ""}),
            Some("a"),
        ),
        fragment(
            1,
            json!({"name": "lookup", "arguments": "{\"q\""}),
            Some("b"),
        ),
        fragment(0, json!({"arguments": "{\"tz\": "}), None),
        fragment(1, json!({"arguments": ": \"x\"}"}), None),
        fragment(0, json!({"arguments": "\"UTC\"}"}), None),
        chunk(json!({}), json!("tool_calls")),
        json!("[DONE]"),
    ];
    let fake = FakeModel::openai(move |_| FakeReply::events(events.clone())).await;
    let answer = call(&*client("openai", &fake, json!({})), &Recorder::default())
        .await
        .unwrap();
    let calls: Vec<_> = answer
        .tool_calls
        .iter()
        .map(|c| (c.id.as_str(), c.name.as_str(), c.arguments.clone()))
        .collect();
    assert_eq!(
        calls,
        [
            ("a", "current_time", json!({"tz": "UTC"})),
            ("b", "lookup", json!({"q": "x"}))
        ]
    );
    assert_eq!(answer.finish_reason.as_deref(), Some("tool_calls"));
}

#[tokio::test]
async fn anthropic_tool_use_split_across_fragments_is_reassembled() {
    let input = json!({"city": "Zürich", "days": [1, 2, 3]});
    let content = json!([
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "toolu_9", "name": "lookup", "input": input}
    ]);
    let body = FakeReply::anthropic(content.clone()).body;
    let fragments = anthropic_events(&body)
        .iter()
        .filter(|event| event["delta"]["type"] == "input_json_delta")
        .count();
    assert!(fragments > 5, "the input comes in {fragments} fragments");
    let fake = FakeModel::anthropic(move |_| {
        let mut reply = FakeReply::anthropic(content.clone());
        reply.body["stop_reason"] = json!("tool_use");
        reply
    })
    .await;
    let deltas = Recorder::default();
    let answer = call(&*client("anthropic", &fake, json!({})), &deltas)
        .await
        .unwrap();
    assert_eq!(deltas.texts().concat(), "Let me look.");
    assert_eq!(answer.text, "Let me look.");
    assert_eq!(answer.tool_calls.len(), 1);
    assert_eq!(answer.tool_calls[0].id, "toolu_9");
    assert_eq!(answer.tool_calls[0].name, "lookup");
    assert_eq!(answer.tool_calls[0].arguments, input);
    assert_eq!(answer.finish_reason.as_deref(), Some("tool_use"));
}

#[tokio::test]
async fn openai_usage_with_cached_tokens_is_read_from_the_last_chunk() {
    let fake = FakeModel::openai(|_| {
        let mut reply = FakeReply::text("cached answer");
        reply.body["usage"] = json!({
            "prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306,
            "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0}
        });
        reply
    })
    .await;
    let answer = call(&*client("openai", &fake, json!({})), &Recorder::default())
        .await
        .unwrap();
    assert_eq!(
        answer.usage,
        Usage {
            input_tokens: 2006,
            output_tokens: 300,
            cached_input_tokens: 1920
        }
    );
}

#[tokio::test]
async fn anthropic_usage_counts_cache_reads_and_writes_as_input() {
    let fake = FakeModel::anthropic(|_| {
        anthropic_usage(json!({
            "input_tokens": 50, "cache_read_input_tokens": 1800,
            "cache_creation_input_tokens": 248, "output_tokens": 42
        }))
    })
    .await;
    let answer = call(
        &*client("anthropic", &fake, json!({})),
        &Recorder::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        answer.usage,
        Usage {
            input_tokens: 50 + 1800 + 248,
            output_tokens: 42,
            cached_input_tokens: 1800
        }
    );
}

#[tokio::test]
async fn the_anthropic_request_caches_the_system_prompt_and_the_last_tool() {
    let fake =
        FakeModel::anthropic(|_| FakeReply::anthropic(json!([{"type": "text", "text": "ok"}])))
            .await;
    call(
        &*client("anthropic", &fake, json!({})),
        &Recorder::default(),
    )
    .await
    .unwrap();
    let sent = fake.request(0);
    assert_eq!(
        sent["system"],
        json!([{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}])
    );
    let tools = sent["tools"].as_array().unwrap();
    assert_eq!(tools.len(), 2);
    assert!(tools[0].get("cache_control").is_none(), "{sent}");
    assert_eq!(tools[1]["name"], "lookup");
    assert_eq!(tools[1]["cache_control"], json!({"type": "ephemeral"}));
}

#[tokio::test]
async fn a_stream_cut_off_midway_fails() {
    let mut events = openai_events(&FakeReply::text("never finished here").body);
    events.truncate(3);
    let fake = FakeModel::openai(move |_| FakeReply::events(events.clone()).cut_off()).await;
    let deltas = Recorder::default();
    let error = call(&*client("openai", &fake, json!({})), &deltas)
        .await
        .unwrap_err();
    assert!(error.is_retryable(), "{error}");
    assert!(
        matches!(error, LlmError::Http(_)),
        "a broken connection: {error:?}"
    );
    assert_eq!(deltas.seen(), texts(&["never ", "finished "]));
}

#[tokio::test]
async fn a_stream_cut_off_midway_is_retried_and_its_deltas_restart() {
    let fake = FakeModel::openai(failing_once(
        || FakeReply::text("second time lucky"),
        |reply| {
            let mut events = openai_events(&reply.body);
            events.truncate(3);
            FakeReply::events(events).cut_off()
        },
    ))
    .await;
    let (answer, seen) = call_with_a_retry("openai", &fake).await;
    assert_eq!(answer.text, "second time lucky");
    let mut expected = texts(&["second ", "time "]);
    expected.push(Seen::Restart);
    expected.extend(texts(&["second ", "time ", "lucky"]));
    assert_eq!(seen, expected);
    assert_eq!(fake.request_count(), 2);
}

#[tokio::test]
async fn an_anthropic_stream_that_ends_before_message_stop_is_retried_and_restarts() {
    let fake = FakeModel::anthropic(failing_once(
        || FakeReply::anthropic(json!([{"type": "text", "text": "whole answer"}])),
        |reply| {
            // message_start, ping, block start, the first word: then a clean end.
            let mut events = anthropic_events(&reply.body);
            events.truncate(4);
            FakeReply::events(events)
        },
    ))
    .await;
    let (answer, seen) = call_with_a_retry("anthropic", &fake).await;
    assert_eq!(answer.text, "whole answer");
    let mut expected = texts(&["whole "]);
    expected.push(Seen::Restart);
    expected.extend(texts(&["whole ", "answer"]));
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn a_stream_that_ends_without_a_finish_is_an_error() {
    let mut events = openai_events(&FakeReply::text("half").body);
    events.truncate(2);
    let fake = FakeModel::openai(move |_| FakeReply::events(events.clone())).await;
    let error = call(&*client("openai", &fake, json!({})), &Recorder::default())
        .await
        .unwrap_err();
    assert!(
        matches!(error, LlmError::Stream(StreamError::Incomplete)),
        "{error:?}"
    );
}

#[tokio::test]
async fn an_openai_error_chunk_is_an_error_and_one_about_the_request_is_not_retried() {
    let events = vec![
        json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": "par"}, "finish_reason": null}]}),
        json!({"error": {"message": "context too long", "type": "invalid_request_error", "code": null}}),
    ];
    let fake = FakeModel::openai(move |_| FakeReply::events(events.clone())).await;
    let error = call(
        &*client("openai", &fake, json!({"maxRetries": 2})),
        &Recorder::default(),
    )
    .await
    .unwrap_err();
    match &error {
        LlmError::Stream(StreamError::Reported { kind, message }) => {
            assert_eq!(kind, "invalid_request_error");
            assert_eq!(message, "context too long");
        }
        other => panic!("not a reported error: {other:?}"),
    }
    assert!(!error.is_retryable());
    assert_eq!(fake.request_count(), 1);
}

#[tokio::test]
async fn an_anthropic_overloaded_error_event_is_retried_like_a_529() {
    let fake = FakeModel::anthropic(failing_once(
        || FakeReply::anthropic(json!([{"type": "text", "text": "after the load"}])),
        |reply| {
            let mut events = anthropic_events(&reply.body);
            events.truncate(4);
            events.push(json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}));
            FakeReply::events(events)
        },
    ))
    .await;
    let (answer, seen) = call_with_a_retry("anthropic", &fake).await;
    assert_eq!(answer.text, "after the load");
    assert_eq!(fake.request_count(), 2);
    assert!(seen.contains(&Seen::Restart));

    let once = FakeModel::anthropic(|_| {
        FakeReply::events(vec![
            json!({"type": "message_start", "message": {"usage": {"input_tokens": 1, "output_tokens": 1}}}),
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        ])
    })
    .await;
    let error = call(
        &*client("anthropic", &once, json!({})),
        &Recorder::default(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&error, LlmError::Stream(StreamError::Reported { kind, .. }) if kind == "overloaded_error"),
        "{error:?}"
    );
    assert!(error.is_retryable());
}

#[tokio::test]
async fn the_first_deltas_arrive_while_the_model_holds_back_the_end() {
    let gate = Arc::new(Notify::new());
    let held = gate.clone();
    let fake = FakeModel::anthropic(move |_| {
        FakeReply::anthropic(json!([{"type": "text", "text": "first words then more"}]))
            .hold_last_until(held.clone())
    })
    .await;
    let model = client("anthropic", &fake, json!({}));
    let deltas = Arc::new(Recorder::default());
    let call = tokio::spawn({
        let deltas = deltas.clone();
        async move { model.complete(&request(), &*deltas).await }
    });
    wait_for("every word as a delta before the end", || async {
        (deltas.texts().concat() == "first words then more").then_some(())
    })
    .await;
    assert!(!call.is_finished(), "the call waits for message_stop");
    gate.notify_one();
    let answer = tokio::time::timeout(DEADLINE, call)
        .await
        .expect("the call ends once the last event came")
        .unwrap()
        .unwrap();
    assert_eq!(answer.text, "first words then more");
}

#[tokio::test]
async fn a_stream_that_goes_quiet_times_out() {
    // The gate is never opened: after the role and the first word, nothing comes.
    let gate = Arc::new(Notify::new());
    let mut events = openai_events(&FakeReply::text("then silence").body);
    events.truncate(3);
    let fake =
        FakeModel::openai(move |_| FakeReply::events(events.clone()).hold_last_until(gate.clone()))
            .await;
    let started = tokio::time::Instant::now();
    let error = call(
        &*client("openai", &fake, json!({"timeoutSeconds": 1})),
        &Recorder::default(),
    )
    .await
    .unwrap_err();
    assert!(error.is_timeout(), "{error:?}");
    assert!(started.elapsed() >= Duration::from_secs(1));
}

#[tokio::test]
async fn an_event_over_the_size_limit_is_refused() {
    let huge = "x".repeat(MAX_EVENT_BYTES + 1);
    let events = vec![
        json!({"choices": [{"index": 0, "delta": {"content": huge}, "finish_reason": null}]}),
        json!("[DONE]"),
    ];
    let fake = FakeModel::openai(move |_| FakeReply::events(events.clone())).await;
    let deltas = Recorder::default();
    let error = call(&*client("openai", &fake, json!({"maxRetries": 2})), &deltas)
        .await
        .unwrap_err();
    assert!(
        matches!(error, LlmError::Stream(StreamError::EventTooLarge)),
        "{error:?}"
    );
    assert!(deltas.seen().is_empty());
    assert_eq!(fake.request_count(), 1, "not retried");
}
