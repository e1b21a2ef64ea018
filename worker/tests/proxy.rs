//! The partition proxy of the test support ([`support::proxy::TcpProxy`]) against a
//! real nats-server: a pause holds a client's traffic without closing its connection,
//! a resume delivers what was held, and a cut closes the connection so the client
//! reconnects through the proxy.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use support::DEADLINE;
use support::nats::NatsServer;
use support::proxy::TcpProxy;
use tokio::sync::mpsc;

/// How long a paused request must stay unanswered to count as held. Long against a
/// loopback round trip (well under a millisecond), short against a test's run.
const HELD: Duration = Duration::from_millis(500);

/// A client on `server` answering every request on `echo` with its payload; returns
/// how many requests it has answered, through a channel.
async fn echo_responder(server: &NatsServer) -> mpsc::UnboundedReceiver<Bytes> {
    let direct = async_nats::connect(server.url()).await.unwrap();
    let mut requests = direct.subscribe("echo").await.unwrap();
    direct.flush().await.unwrap();
    let (seen, received) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(request) = requests.next().await {
            let _ = seen.send(request.payload.clone());
            if let Some(reply) = request.reply {
                let _ = direct.publish(reply, request.payload).await;
            }
        }
    });
    received
}

/// A client connected through `proxy`, reporting its connection events.
async fn client_through(
    proxy: &TcpProxy,
) -> (
    async_nats::Client,
    mpsc::UnboundedReceiver<async_nats::Event>,
) {
    let (events, received) = mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::new()
        .request_timeout(Some(DEADLINE))
        .event_callback(move |event| {
            let events = events.clone();
            async move {
                let _ = events.send(event);
            }
        })
        .connect(proxy.addr().to_string())
        .await
        .unwrap();
    (client, received)
}

async fn request(client: &async_nats::Client, payload: &'static str) -> Bytes {
    tokio::time::timeout(DEADLINE, client.request("echo", Bytes::from(payload)))
        .await
        .unwrap_or_else(|_| panic!("no answer to {payload} within {DEADLINE:?}"))
        .unwrap_or_else(|e| panic!("request {payload}: {e}"))
        .payload
}

/// Reads `events` until `wanted` comes, failing the test after [`DEADLINE`].
async fn wait_event(
    events: &mut mpsc::UnboundedReceiver<async_nats::Event>,
    wanted: async_nats::Event,
) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap_or_else(|_| panic!("no {wanted} event within {DEADLINE:?}"))
            .expect("the client is open");
        if event == wanted {
            return;
        }
    }
}

#[tokio::test]
async fn a_pause_holds_traffic_on_open_connections_and_a_resume_delivers_it() {
    let server = NatsServer::start().await;
    let mut answered = echo_responder(&server).await;
    let proxy = TcpProxy::start(SocketAddr::from(([127, 0, 0, 1], server.port)));
    let (client, _events) = client_through(&proxy).await;
    assert_eq!(request(&client, "before").await, "before");
    assert_eq!(answered.recv().await.unwrap(), "before");

    proxy.pause();
    let held = tokio::spawn({
        let client = client.clone();
        async move { request(&client, "held").await }
    });
    let mut held = held;
    assert!(
        tokio::time::timeout(HELD, &mut held).await.is_err(),
        "a request through a paused proxy was answered"
    );
    assert!(
        answered.try_recv().is_err(),
        "a request through a paused proxy reached the server"
    );
    // The partition is invisible to the client: its connection is open.
    assert_eq!(proxy.open_connections(), 1);
    assert_eq!(
        client.connection_state(),
        async_nats::connection::State::Connected
    );

    proxy.resume();
    let answer = tokio::time::timeout(DEADLINE, held)
        .await
        .expect("the held request is answered after the resume")
        .unwrap();
    assert_eq!(answer, "held");
    assert_eq!(request(&client, "after").await, "after");
}

#[tokio::test]
async fn a_cut_closes_the_connection_and_the_client_reconnects_through_the_proxy() {
    let server = NatsServer::start().await;
    let _answered = echo_responder(&server).await;
    let proxy = TcpProxy::start(SocketAddr::from(([127, 0, 0, 1], server.port)));
    let (client, mut events) = client_through(&proxy).await;
    assert_eq!(request(&client, "before").await, "before");

    proxy.cut();
    wait_event(&mut events, async_nats::Event::Disconnected).await;
    wait_event(&mut events, async_nats::Event::Connected).await;
    assert_eq!(request(&client, "after").await, "after");
    assert_eq!(proxy.open_connections(), 1);
}
