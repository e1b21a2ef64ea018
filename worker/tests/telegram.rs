//! The Telegram channel against a local Bot API server (support/telegram.rs), with
//! the real worker and a scripted agent: messages fetched by long polling are
//! answered in their chat; the poller's offset survives a restart and a move to
//! another worker on NATS; the webhook endpoint checks its secret token; long answers
//! are split; a 429 is waited out; `/reset` starts a new conversation; drafts of a
//! streamed answer are throttled.

mod support;

use std::path::Path;
use std::time::Duration;

use nexo_api::{Envelope, ResourceKey, subject};
use serde_json::{Value, json};
use support::nats::NatsServer;
use support::process::WorkerProcess;
use support::telegram::FakeBotApi;
use support::{TempDir, TestWorker, WorkerOptions, wait_for_within};

/// The bot's token: the value of the variable the channel names.
const TOKEN: &str = env!("CARGO_PKG_NAME");
const CHAT: i64 = 4242;
const USER: i64 = 77;
const LONG: Duration = Duration::from_secs(30);

/// A scripted agent `bot` echoing the message and the conversation's history, and a
/// Telegram channel `tg` polling `api`; `extra`: more lines of the `telegram:` block.
fn config(api: &str, extra: &str) -> String {
    format!(
        "agents:
  - name: bot
    spec:
      model:
        provider: scripted
        script:
          - {{contains: long, reply: \"{long}\"}}
          - reply: 'echo {{{{input}}}} | history: {{{{history}}}}'
channels:
  - name: tg
    spec:
      defaultAgent: bot
      telegram:
        botToken: {{env: CARGO_PKG_NAME}}
        apiBaseUrl: {api}
        pollTimeoutSeconds: 1
{extra}",
        long = long_answer().replace('\n', "\\n"),
    )
}

/// The streaming `writer` agent of `model_url` behind a Telegram channel polling
/// `api_url`.
fn writer_config(model_url: &str, api_url: &str) -> String {
    format!(
        "{}channels:
  - name: tg
    spec:
      defaultAgent: writer
      telegram:
        botToken: {{env: CARGO_PKG_NAME}}
        apiBaseUrl: {api_url}
        pollTimeoutSeconds: 1
",
        support::openai_writer(model_url),
    )
}

/// Three paragraphs of 2000 characters: more than one message.
fn long_answer() -> String {
    (0..3)
        .map(|i| format!("{} end{i}.", "word ".repeat(398)))
        .collect::<Vec<_>>()
        .join("\n\n")
}

async fn start(yaml: &str, data_dir: Option<&Path>) -> TestWorker {
    TestWorker::start_with(
        WorkerOptions {
            data_dir: data_dir.map(Path::to_owned),
            ..Default::default()
        },
        yaml,
    )
    .await
}

fn echoed(text: &str) -> (String, String) {
    let (input, history) = text
        .strip_prefix("echo ")
        .and_then(|t| t.split_once(" | history:"))
        .unwrap_or_else(|| panic!("an echo: {text}"));
    (input.to_owned(), history.trim().to_owned())
}

#[tokio::test]
async fn a_polled_message_is_answered_in_its_chat_with_typing_first() {
    let api = FakeBotApi::start().await;
    let worker = start(&config(&api.url, ""), None).await;
    let mut health = worker.broker.subscribe("plugin.health.>").await.unwrap();
    let update = api.push_text(CHAT, "private", USER, "hello");
    let texts = api.wait_for_texts(CHAT, 1).await;
    assert_eq!(echoed(&texts[0]).0, "hello");

    // The poller says it reaches Telegram: on the bus, and in `/catalog` with its
    // place in the updates.
    let said = tokio::time::timeout(LONG, health.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(said.subject, "plugin.health.telegram.default.tg");
    let said: Value = serde_json::from_slice(&said.payload).unwrap();
    assert_eq!(said["connected"], true);
    let listed = wait_for_within(LONG, "the connection in /catalog", || async {
        let report: Value = worker
            .http
            .get(worker.url("/catalog"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let entry = report["channelConnections"].as_array()?.first()?.clone();
        let cursor: i64 = entry["cursor"].as_str()?.parse().ok()?;
        (cursor > update).then_some(entry)
    })
    .await;
    assert_eq!(listed["channel"], "default/tg");
    assert_eq!(listed["type"], "telegram");
    assert_eq!(listed["connected"], true);
    let metrics = worker
        .http
        .get(worker.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let metrics = support::prometheus::Scrape::parse(&metrics);
    assert_eq!(
        metrics.expect(
            "nexo_channel_connected",
            &[("channel", "telegram"), ("instance", "tg")]
        ),
        1.0
    );
    let send = &api.calls("sendMessage")[0];
    assert_eq!(send.token, TOKEN);
    assert_eq!(send.body["parse_mode"], "HTML");
    let typing = api.calls("sendChatAction");
    assert!(
        typing.iter().any(|c| c.body["chat_id"] == json!(CHAT)
            && c.body["action"] == "typing"
            && c.at <= send.at),
        "{typing:?}"
    );
    // Polling removes a webhook first.
    assert!(!api.calls("deleteWebhook").is_empty());
    worker.stop().await;
}

#[tokio::test]
async fn an_update_is_not_answered_again_after_a_restart() {
    let api = FakeBotApi::start().await;
    let dir = TempDir::new();
    let yaml = config(&api.url, "");
    let first = start(&yaml, Some(dir.path())).await;
    let one = api.push_text(CHAT, "private", USER, "one");
    api.wait_for_texts(CHAT, 1).await;
    first.stop().await;
    let polls_before = api.calls("getUpdates").len();

    let second = start(&yaml, Some(dir.path())).await;
    api.push_text(CHAT, "private", USER, "two");
    let texts = api.wait_for_texts(CHAT, 2).await;
    let inputs: Vec<String> = texts.iter().map(|t| echoed(t).0).collect();
    assert_eq!(inputs, ["one", "two"]);
    // The restarted poller went on from the stored offset.
    let resumed = &api.calls("getUpdates")[polls_before];
    assert_eq!(resumed.body["offset"].as_i64(), Some(one + 1));
    second.stop().await;
    assert_eq!(api.sent_texts(CHAT).len(), 2);
}

#[tokio::test]
async fn on_nats_one_poller_moves_to_another_worker_and_nothing_is_lost_or_repeated() {
    let nats = NatsServer::start().await;
    let api = FakeBotApi::start().await;
    let yaml = config(&api.url, "");
    let options = || WorkerOptions {
        broker: format!("{{type: nats, urls: ['{}']}}", nats.url()),
        ..Default::default()
    };
    let first = TestWorker::start_with(options(), &yaml).await;
    // The first worker holds the poller's lease once it polls.
    wait_for_within(LONG, "the first worker polls", || async {
        (!api.calls("getUpdates").is_empty()).then_some(())
    })
    .await;
    let second = TestWorker::start_with(options(), &yaml).await;
    let one = api.push_text(CHAT, "private", USER, "one");
    api.wait_for_texts(CHAT, 1).await;
    first.stop().await;
    api.push_text(CHAT, "private", USER, "two");
    let texts = api.wait_for_texts(CHAT, 2).await;
    let inputs: Vec<String> = texts.iter().map(|t| echoed(t).0).collect();
    assert_eq!(inputs, ["one", "two"]);
    // The second worker's poller started from the offset the first one stored.
    let offsets: Vec<Option<i64>> = api
        .calls("getUpdates")
        .iter()
        .map(|c| c.body["offset"].as_i64())
        .collect();
    assert!(
        offsets.iter().all(|o| o.is_none_or(|o| o <= one + 2)),
        "{offsets:?}"
    );
    let after_first: Vec<&Option<i64>> = offsets.iter().skip_while(|o| o.is_none()).collect();
    assert!(
        after_first.iter().all(|o| o.is_some()),
        "no poller started over without an offset: {offsets:?}"
    );
    second.stop().await;
    assert_eq!(api.sent_texts(CHAT).len(), 2);
}

#[tokio::test]
async fn webhook_mode_refuses_a_wrong_secret_token_and_answers_a_right_one() {
    let api = FakeBotApi::start().await;
    let extra = "        mode: webhook
        webhook:
          secretToken: {env: CARGO_PKG_NAME}
          url: https://bot.example.com/v1/telegram/tg
";
    let worker = start(&config(&api.url, extra), None).await;
    let mut inbound = worker
        .broker
        .subscribe(&subject::inbound(
            "telegram",
            &ResourceKey::new("default", "tg"),
        ))
        .await
        .unwrap();
    let registered = wait_for_within(LONG, "setWebhook", || async {
        api.calls("setWebhook").into_iter().next()
    })
    .await;
    assert_eq!(
        registered.body["url"],
        "https://bot.example.com/v1/telegram/tg"
    );
    assert_eq!(registered.body["secret_token"], TOKEN);

    let url = worker.url("/v1/telegram/tg");
    let wrong = support::telegram::update(1, CHAT, "private", USER, "wrong");
    for token in [Some("not-the-token"), None] {
        let mut request = worker.http.post(&url).json(&wrong);
        if let Some(token) = token {
            request = request.header("x-telegram-bot-api-secret-token", token);
        }
        assert_eq!(request.send().await.unwrap().status().as_u16(), 401);
    }
    let right = support::telegram::update(2, CHAT, "private", USER, "right");
    let response = worker
        .http
        .post(&url)
        .header("x-telegram-bot-api-secret-token", TOKEN)
        .json(&right)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    // The first message published is the right one: the wrong ones never were.
    let message = support::next_message(&mut inbound, "the accepted update").await;
    let envelope = Envelope::from_json(&message.payload).unwrap();
    assert_eq!(envelope.text, "right");
    assert_eq!(envelope.conversation, CHAT.to_string());
    let texts = api.wait_for_texts(CHAT, 1).await;
    assert_eq!(echoed(&texts[0]).0, "right");
    // Telegram sending the same update again is taken once.
    let again = worker
        .http
        .post(&url)
        .header("x-telegram-bot-api-secret-token", TOKEN)
        .json(&right)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status().as_u16(), 200);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), inbound.next())
            .await
            .is_err(),
        "a repeated update is not published again"
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_long_answer_is_split_at_paragraphs_into_parts_telegram_takes() {
    let api = FakeBotApi::start().await;
    let extra = "        limits: {perChatPerSecond: 50}\n";
    let worker = start(&config(&api.url, extra), None).await;
    api.push_text(CHAT, "private", USER, "a long one please");
    let texts = api.wait_for_texts(CHAT, 2).await;
    for part in &texts {
        assert!(part.encode_utf16().count() <= 4096, "{}", part.len());
        assert!(
            part.ends_with('.'),
            "a part ends at a paragraph: …{}",
            &part[part.len() - 20..]
        );
    }
    let joined: String = texts.join(" ");
    let words = |text: &str| {
        text.split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(words(&joined), words(&long_answer()));
    worker.stop().await;
}

#[tokio::test]
async fn a_429_is_waited_out_and_the_message_arrives_after_retry_after() {
    let api = FakeBotApi::start().await;
    api.refuse_next_sends(1);
    let worker = start(&config(&api.url, ""), None).await;
    api.push_text(CHAT, "private", USER, "hi");
    let texts = api.wait_for_texts(CHAT, 1).await;
    assert_eq!(echoed(&texts[0]).0, "hi");
    let sends = api.calls("sendMessage");
    assert_eq!(sends.len(), 2, "one refusal, one send");
    assert!(!sends[0].ok && sends[1].ok);
    assert!(
        sends[1].at.duration_since(sends[0].at) >= Duration::from_secs(1),
        "sent again only after retry_after"
    );
    worker.stop().await;
}

#[tokio::test]
async fn reset_starts_a_new_conversation_and_commands_never_reach_the_agent() {
    let api = FakeBotApi::start().await;
    let worker = start(
        &config(&api.url, "        limits: {perChatPerSecond: 50}\n"),
        None,
    )
    .await;
    api.push_text(CHAT, "private", USER, "/start");
    let greeting = api.wait_for_texts(CHAT, 1).await;
    assert!(greeting[0].starts_with("Hello!"), "{}", greeting[0]);
    api.push_text(CHAT, "private", USER, "one");
    api.wait_for_texts(CHAT, 2).await;
    api.push_text(CHAT, "private", USER, "two");
    let texts = api.wait_for_texts(CHAT, 3).await;
    assert_eq!(echoed(&texts[2]), ("two".to_owned(), "one".to_owned()));
    api.push_text(CHAT, "private", USER, "/reset");
    let texts = api.wait_for_texts(CHAT, 4).await;
    assert!(texts[3].starts_with("Done"), "{}", texts[3]);
    api.push_text(CHAT, "private", USER, "three");
    let texts = api.wait_for_texts(CHAT, 5).await;
    assert_eq!(echoed(&texts[4]), ("three".to_owned(), String::new()));
    // No answer of the agent echoes a command.
    assert!(texts.iter().all(|t| !t.starts_with("echo /")), "{texts:?}");
    worker.stop().await;
}

#[tokio::test]
async fn drafts_of_a_streamed_answer_come_at_most_every_one_and_a_half_seconds() {
    let api = FakeBotApi::start().await;
    let answer = "one two three four five six";
    let (model, gate) = support::model_holding_back_its_last_chunk(answer).await;
    let yaml = writer_config(&model.base_url, &api.url);
    let worker = start(&yaml, None).await;
    api.push_text(CHAT, "private", USER, "write");
    let drafts = wait_for_within(LONG, "two drafts", || async {
        let drafts = api.calls("sendMessageDraft");
        (drafts.len() >= 2).then_some(drafts)
    })
    .await;
    gate.notify_one();
    let texts = api.wait_for_texts(CHAT, 1).await;
    assert_eq!(texts[0], answer);
    let drafts_then = api.calls("sendMessageDraft");
    let final_send = &api.calls("sendMessage")[0];
    for pair in drafts_then.windows(2) {
        assert!(
            pair[1].at.duration_since(pair[0].at) >= Duration::from_millis(1450),
            "drafts throttled: {:?}",
            pair[1].at.duration_since(pair[0].at)
        );
    }
    assert!(
        drafts_then.iter().all(|d| d.at <= final_send.at),
        "no draft after the answer"
    );
    let id = &drafts[0].body["draft_id"];
    assert!(id.as_i64().is_some_and(|id| id != 0));
    assert!(
        drafts
            .iter()
            .all(|d| d.body["draft_id"] == *id && d.body["chat_id"] == json!(CHAT))
    );
    let last: &Value = &drafts[1].body["text"];
    assert!(answer.starts_with(last.as_str().unwrap()), "{last}");
    worker.stop().await;
}

/// In a group, where drafts do not exist, the answer is shown in a message of its own
/// that grows by edits at most every 1.5 s, and that message becomes the answer: one
/// message in the chat, not a preview and an answer.
#[tokio::test]
async fn a_group_sees_the_answer_grow_in_one_message_that_becomes_the_answer() {
    let api = FakeBotApi::start().await;
    let answer = "one two three four five six";
    let (model, gate) = support::model_holding_back_its_last_chunk(answer).await;
    let yaml = writer_config(&model.base_url, &api.url);
    let worker = start(&yaml, None).await;
    let asked = tokio::time::Instant::now();
    api.push_text(CHAT, "group", USER, "write");
    // The model holds back its last word: the words so far go to a message of their
    // own, once the answer has been written for a while.
    let preview = wait_for_within(LONG, "the first words in the chat", || async {
        api.calls("sendMessage").into_iter().find(|c| c.ok)
    })
    .await;
    assert!(preview.at.duration_since(asked) >= Duration::from_millis(1400));
    assert!(
        preview.body["parse_mode"].is_null(),
        "the text so far is plain"
    );
    let so_far = preview.body["text"].as_str().unwrap();
    assert!(
        answer.starts_with(so_far) && so_far.len() < answer.len(),
        "{so_far}"
    );
    assert!(
        api.calls("sendMessageDraft").is_empty(),
        "no drafts in a group"
    );
    gate.notify_one();
    let last = wait_for_within(LONG, "the answer edited in", || async {
        api.calls("editMessageText")
            .into_iter()
            .find(|c| c.body["parse_mode"] == "HTML")
    })
    .await;
    assert_eq!(last.body["text"], answer);
    // Every edit is of one message, the one the first words went to.
    let edits = api.calls("editMessageText");
    assert!(edits[0].body["message_id"].as_i64().is_some());
    assert!(
        edits
            .iter()
            .all(|e| e.body["message_id"] == edits[0].body["message_id"])
    );
    for pair in edits.windows(2) {
        assert!(
            pair[1].at.duration_since(pair[0].at) >= Duration::from_millis(1000),
            "edits throttled: {:?}",
            pair[1].at.duration_since(pair[0].at)
        );
    }
    assert_eq!(api.sent_texts(CHAT).len(), 1, "one message in the chat");
    worker.stop().await;
}

/// The worker binary running the poller is SIGKILLed while updates stream in, one of
/// its answers held by a 429 (so the kill cannot fall between Telegram taking an
/// answer and its acknowledgement, which no Bot API call could make exactly-once);
/// restarted, it takes the poller's lease again once it expires, goes on from the
/// stored offset, and answers the rest: every update answered, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poller_killed_mid_stream_loses_no_update_and_answers_none_twice() {
    let nats = NatsServer::start().await;
    let api = FakeBotApi::start().await;
    let dir = TempDir::new();
    let worker_config = |name: &str| {
        let path = dir.path().join(format!("{name}.yaml"));
        let yaml = format!(
            "worker:\n  dataDir: {}\n  http: {{listen: '127.0.0.1:0'}}\n  broker: {{type: nats, urls: ['{}']}}\n{}",
            dir.path().join(name).display(),
            nats.url(),
            config(&api.url, "")
        );
        std::fs::write(&path, yaml).unwrap();
        path
    };
    let mut first = WorkerProcess::spawn(&worker_config("first"), &[]).await;
    let mut pushed: Vec<String> = Vec::new();
    for i in 0..10 {
        pushed.push(format!("m{i}"));
        api.push_text(CHAT, "private", USER, &format!("m{i}"));
    }
    wait_for_within(LONG, "three answers", || async {
        (api.sent_texts(CHAT).len() >= 3).then_some(())
    })
    .await;
    // From now on Telegram refuses sends with 429: the next answer waits in the
    // worker when it dies.
    api.refuse_next_sends(u32::MAX);
    let refused_before = api.calls("sendMessage").iter().filter(|c| !c.ok).count();
    wait_for_within(LONG, "an answer held by a 429", || async {
        let refused = api.calls("sendMessage").iter().filter(|c| !c.ok).count();
        (refused > refused_before).then_some(())
    })
    .await;
    first.kill();
    let answered = api.sent_texts(CHAT).len();
    assert!(answered < pushed.len(), "nothing was in flight at the kill");
    for i in 10..15 {
        pushed.push(format!("m{i}"));
        api.push_text(CHAT, "private", USER, &format!("m{i}"));
    }
    api.refuse_next_sends(0);
    // Restarted, on its own data directory: it takes the poller's lease again once
    // the dead process's expires.
    let _restarted = WorkerProcess::spawn(&worker_config("first"), &[]).await;
    let texts = wait_for_within(
        Duration::from_secs(120),
        "every update answered",
        || async {
            let texts = api.sent_texts(CHAT);
            (texts.len() >= pushed.len()).then_some(texts)
        },
    )
    .await;
    let mut inputs: Vec<String> = texts.iter().map(|t| echoed(t).0).collect();
    inputs.sort();
    let mut expected = pushed.clone();
    expected.sort();
    assert_eq!(inputs, expected, "each update answered exactly once");
}
