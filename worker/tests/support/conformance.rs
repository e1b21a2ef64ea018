//! Behaviour every [`Broker`] must have, as one suite each implementation runs
//! (`tests/local_broker.rs` on the in-process bus, `tests/nats_broker.rs` against a
//! real server, `tests/durability.rs` both through the outbox). Test support only: it
//! is not compiled into the worker. Panics on the first violation, naming it.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use nexo_worker::broker::{
    Broker, BrokerError, ConsumeOptions, Delivery, Message, Subscription, WorkSource,
};

const DEADLINE: Duration = Duration::from_secs(5);

/// Runs every check, each against a fresh broker from `make`.
pub async fn run_all<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    exact_subject(make().await.as_ref()).await;
    star_matches_one_token(make().await.as_ref()).await;
    tail_matches_the_rest(make().await.as_ref()).await;
    fan_out_to_every_subscriber(make().await.as_ref()).await;
    queue_group_delivers_once(make().await.as_ref()).await;
    order_is_kept_per_subject(make().await.as_ref()).await;
    request_reply(make().await.as_ref()).await;
    request_times_out(make().await.as_ref()).await;
    request_without_responders(make().await.as_ref()).await;
    dropped_subscription_stops(make().await.as_ref()).await;
    invalid_subjects_are_refused(make().await.as_ref()).await;
    durable_work_is_redelivered_until_acked(make().await.as_ref()).await;
    delayed_nak_is_redelivered_after_the_delay(make().await.as_ref()).await;
    durable_work_waits_for_its_first_consumer(make().await.as_ref()).await;
    durable_work_outlives_its_consumer(make().await.as_ref()).await;
}

async fn recv(sub: &mut Subscription, what: &str) -> Message {
    super::next_message(sub, what).await
}

fn text(message: &Message) -> &str {
    std::str::from_utf8(&message.payload).expect("utf-8 payload")
}

async fn exact_subject(broker: &dyn Broker) {
    let mut sub = broker.subscribe("conf.exact.a").await.unwrap();
    broker
        .publish("conf.exact.b", Bytes::from("no"))
        .await
        .unwrap();
    broker
        .publish("conf.exact.a", Bytes::from("yes"))
        .await
        .unwrap();
    let got = recv(&mut sub, "exact subject").await;
    assert_eq!(got.subject, "conf.exact.a");
    assert_eq!(
        text(&got),
        "yes",
        "exact subject received a non-matching message"
    );
    assert_eq!(got.reply, None);
}

async fn star_matches_one_token(broker: &dyn Broker) {
    let mut sub = broker.subscribe("conf.star.*").await.unwrap();
    // Messages from one publisher arrive in order, so the first one received proves
    // the ones published before it were not delivered.
    broker
        .publish("conf.star.a.b", Bytes::from("deep"))
        .await
        .unwrap();
    broker
        .publish("conf.star", Bytes::from("short"))
        .await
        .unwrap();
    broker
        .publish("conf.star.a", Bytes::from("match"))
        .await
        .unwrap();
    assert_eq!(text(&recv(&mut sub, "`*`").await), "match");
}

async fn tail_matches_the_rest(broker: &dyn Broker) {
    let mut sub = broker.subscribe("conf.tail.>").await.unwrap();
    broker
        .publish("conf.tail", Bytes::from("prefix"))
        .await
        .unwrap();
    broker
        .publish("conf.other.a", Bytes::from("other"))
        .await
        .unwrap();
    broker
        .publish("conf.tail.a", Bytes::from("one"))
        .await
        .unwrap();
    broker
        .publish("conf.tail.a.b.c", Bytes::from("three"))
        .await
        .unwrap();
    assert_eq!(text(&recv(&mut sub, "`>` one token").await), "one");
    assert_eq!(text(&recv(&mut sub, "`>` three tokens").await), "three");
}

async fn fan_out_to_every_subscriber(broker: &dyn Broker) {
    let mut a = broker.subscribe("conf.fan").await.unwrap();
    let mut b = broker.subscribe("conf.*").await.unwrap();
    broker.publish("conf.fan", Bytes::from("x")).await.unwrap();
    assert_eq!(text(&recv(&mut a, "fan-out a").await), "x");
    assert_eq!(text(&recv(&mut b, "fan-out b").await), "x");
}

async fn queue_group_delivers_once(broker: &dyn Broker) {
    const N: usize = 200;
    let mut members = [
        broker.queue_subscribe("conf.q.>", "workers").await.unwrap(),
        broker.queue_subscribe("conf.q.>", "workers").await.unwrap(),
    ];
    let mut watcher = broker.subscribe("conf.q.>").await.unwrap();
    for i in 0..N {
        broker
            .publish("conf.q.job", Bytes::from(i.to_string()))
            .await
            .unwrap();
    }
    for i in 0..N {
        assert_eq!(
            text(&recv(&mut watcher, "plain subscriber beside a group").await),
            i.to_string()
        );
    }
    let mut seen = HashSet::new();
    let mut per_member = [0usize; 2];
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while seen.len() < N {
        let [m0, m1] = &mut members;
        let (index, message) = tokio::select! {
            Some(m) = m0.next() => (0, m),
            Some(m) = m1.next() => (1, m),
            _ = tokio::time::sleep_until(deadline) => panic!("queue group: only {} of {N} delivered", seen.len()),
        };
        per_member[index] += 1;
        assert!(
            seen.insert(text(&message).to_owned()),
            "queue group delivered {} twice",
            text(&message)
        );
    }
    assert!(
        per_member.iter().all(|n| *n > 0),
        "queue group used one member only: {per_member:?}"
    );
}

async fn order_is_kept_per_subject(broker: &dyn Broker) {
    const N: usize = 1000;
    let mut sub = broker.subscribe("conf.order").await.unwrap();
    for i in 0..N {
        broker
            .publish("conf.order", Bytes::from(i.to_string()))
            .await
            .unwrap();
    }
    for i in 0..N {
        assert_eq!(
            text(&recv(&mut sub, "ordering").await),
            i.to_string(),
            "out of order"
        );
    }
}

async fn request_reply(broker: &dyn Broker) {
    let mut service = broker.subscribe("conf.echo").await.unwrap();
    let requests = async {
        broker
            .request("conf.echo", Bytes::from("ping"), DEADLINE)
            .await
    };
    let responder = async {
        let request = recv(&mut service, "request").await;
        let reply = request
            .reply
            .clone()
            .expect("request carries a reply subject");
        broker
            .publish(&reply, Bytes::from(format!("{}-pong", text(&request))))
            .await
            .unwrap();
    };
    let (response, ()) = tokio::join!(requests, responder);
    assert_eq!(text(&response.unwrap()), "ping-pong");
}

async fn request_times_out(broker: &dyn Broker) {
    let _silent = broker.subscribe("conf.silent").await.unwrap();
    let timeout = Duration::from_millis(200);
    let err = broker
        .request("conf.silent", Bytes::from("?"), timeout)
        .await
        .unwrap_err();
    assert!(
        matches!(err, BrokerError::Timeout { .. }),
        "expected a timeout, got {err:?}"
    );
}

async fn request_without_responders(broker: &dyn Broker) {
    let err = broker
        .request("conf.nobody", Bytes::from("?"), DEADLINE)
        .await
        .unwrap_err();
    assert!(
        matches!(err, BrokerError::NoResponders(_)),
        "expected no responders, got {err:?}"
    );
}

async fn dropped_subscription_stops(broker: &dyn Broker) {
    let gone = broker.subscribe("conf.drop").await.unwrap();
    drop(gone);
    let mut kept = broker.subscribe("conf.drop").await.unwrap();
    broker
        .publish("conf.drop", Bytes::from("after"))
        .await
        .unwrap();
    assert_eq!(
        text(&recv(&mut kept, "after a dropped subscription").await),
        "after"
    );
}

async fn invalid_subjects_are_refused(broker: &dyn Broker) {
    assert!(
        broker.publish("conf.*", Bytes::new()).await.is_err(),
        "publish on a wildcard"
    );
    assert!(
        broker.publish("conf..x", Bytes::new()).await.is_err(),
        "empty token"
    );
    assert!(
        broker.publish("", Bytes::new()).await.is_err(),
        "empty subject"
    );
    assert!(broker.subscribe("conf.>.x").await.is_err(), "`>` not last");
    assert!(broker.subscribe("conf.a*").await.is_err(), "partial `*`");
}

async fn next_work(work: &mut Box<dyn WorkSource>, what: &str) -> Delivery {
    match tokio::time::timeout(DEADLINE, work.next()).await {
        Ok(Ok(delivery)) => delivery,
        Ok(Err(err)) => panic!("{what}: {err}"),
        Err(_) => panic!("{what}: nothing delivered within {DEADLINE:?}"),
    }
}

async fn durable_work_is_redelivered_until_acked(broker: &dyn Broker) {
    let subject = "agent.route.conformance.durable";
    let mut work = broker
        .consume(subject, "conformance_durable", ConsumeOptions::default())
        .await
        .expect("durable consumer");
    broker.publish(subject, Bytes::from("job")).await.unwrap();
    let first = next_work(&mut work, "first delivery").await;
    assert_eq!(text(&first.message), "job");
    assert_eq!(first.attempt, 1);
    first.acker.nak(None).await.unwrap();
    let second = next_work(&mut work, "redelivery after nak").await;
    assert_eq!(text(&second.message), "job");
    assert_eq!(second.attempt, 2, "redelivery counts attempts");
    second.acker.ack().await.unwrap();
    broker.publish(subject, Bytes::from("next")).await.unwrap();
    let third = next_work(&mut work, "after ack").await;
    assert_eq!(text(&third.message), "next", "an acked message came back");
    third.acker.ack().await.unwrap();
}

async fn delayed_nak_is_redelivered_after_the_delay(broker: &dyn Broker) {
    let (subject, durable) = fresh("delayed");
    let mut work = broker
        .consume(&subject, &durable, ConsumeOptions::default())
        .await
        .expect("durable consumer");
    broker
        .publish(&subject, Bytes::from("later"))
        .await
        .unwrap();
    let first = next_work(&mut work, "first delivery").await;
    let delay = Duration::from_millis(300);
    let nacked = std::time::Instant::now();
    first.acker.nak(Some(delay)).await.unwrap();
    broker.publish(&subject, Bytes::from("now")).await.unwrap();
    let second = next_work(&mut work, "work published after the delayed nak").await;
    assert_eq!(text(&second.message), "now", "the delayed message waits");
    second.acker.ack().await.unwrap();
    let third = next_work(&mut work, "redelivery after the delay").await;
    assert_eq!(text(&third.message), "later");
    assert_eq!(third.attempt, 2);
    assert!(nacked.elapsed() >= delay, "redelivered before its delay");
    third.acker.ack().await.unwrap();
}

/// A subject and a consumer name no earlier run on the same server has used.
fn fresh(what: &str) -> (String, String) {
    let unique = uuid::Uuid::new_v4().simple().to_string();
    (
        format!("agent.route.conformance.{what}{unique}"),
        format!("conformance_{what}_{unique}"),
    )
}

async fn durable_work_waits_for_its_first_consumer(broker: &dyn Broker) {
    let (subject, durable) = fresh("early");
    for text in ["one", "two"] {
        broker.publish(&subject, Bytes::from(text)).await.unwrap();
    }
    let mut work = broker
        .consume(&subject, &durable, ConsumeOptions::default())
        .await
        .expect("durable consumer");
    for expected in ["one", "two"] {
        let delivery = next_work(&mut work, "work published before the consumer").await;
        assert_eq!(text(&delivery.message), expected, "in publish order");
        assert_eq!(delivery.attempt, 1);
        delivery.acker.ack().await.unwrap();
    }
}

async fn durable_work_outlives_its_consumer(broker: &dyn Broker) {
    let (subject, durable) = fresh("outlive");
    let attach = || broker.consume(&subject, &durable, ConsumeOptions::default());
    let mut work = attach().await.expect("durable consumer");
    broker.publish(&subject, Bytes::from("held")).await.unwrap();
    let held = next_work(&mut work, "first delivery").await;
    drop(work);
    // Handed back after its consumer stopped, and published while none is attached:
    // both go to the next consumer of the same name.
    held.acker.nak(None).await.unwrap();
    broker
        .publish(&subject, Bytes::from("later"))
        .await
        .unwrap();
    let mut work = attach().await.expect("durable consumer again");
    let mut seen = Vec::new();
    for _ in 0..2 {
        let delivery = next_work(&mut work, "work of the stopped consumer").await;
        seen.push((text(&delivery.message).to_owned(), delivery.attempt));
        delivery.acker.ack().await.unwrap();
    }
    seen.sort();
    assert_eq!(seen, [("held".to_owned(), 2), ("later".to_owned(), 1)]);
}
