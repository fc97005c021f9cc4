//! Bad input from raw sockets: each case gets a FATAL ErrorResponse with
//! SQLSTATE 08P01 and a precise message, and a session opened before keeps
//! working.

use crate::support::{self, frame, query, startup_packet, Harness, RawClient};

/// Sends `bytes` on a fresh connection (after logging in when `login`)
/// and checks that the proxy answers with a FATAL error of `sqlstate`
/// whose message contains `expected`, then closes.
async fn assert_refused(
    harness: &Harness,
    login: bool,
    bytes: &[u8],
    sqlstate: &str,
    expected: &str,
) {
    let mut client = if login {
        RawClient::login(harness.proxy).await.0
    } else {
        RawClient::connect(harness.proxy).await
    };
    client.send_lenient(bytes).await;
    let messages = client.until_closed().await;
    let error = messages
        .iter()
        .find(|m| m.tag == b'E')
        .unwrap_or_else(|| panic!("no ErrorResponse for {expected:?}, got {messages:?}"));
    assert_eq!(error.field(b'V').as_deref(), Some("FATAL"), "{error:?}");
    assert_eq!(error.sqlstate().as_deref(), Some(sqlstate), "{error:?}");
    let message = error.field(b'M').unwrap_or_default();
    assert!(
        message.contains(expected),
        "expected {expected:?} in {message:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_refused_and_others_keep_running() {
    let harness = Harness::start().await;
    let (bystander, _) = harness.connect().await;
    bystander
        .batch_execute("begin; create temp table kept(i int); insert into kept values (1)")
        .await
        .expect("work in progress");

    // A startup packet whose parameter list is not terminated.
    let mut unterminated = startup_packet(196_608, &[("user", "postgres")]);
    unterminated.pop();
    unterminated[3] -= 1;
    // A length field that lies: the Query claims 8 bytes, so its string has
    // no terminator within the message.
    let mut lying = b"Q\0\0\0\x08select 1\0".to_vec();
    lying.extend_from_slice(&frame(b'S', b""));
    // A Bind whose parameter length runs past the end of the message.
    let mut bind = b"\0\0\0\0\0\x01".to_vec();
    bind.extend_from_slice(&1000_i32.to_be_bytes());
    bind.extend_from_slice(b"abc\0\0");

    let cases: [(bool, Vec<u8>, &str); 8] = [
        // Not PostgreSQL at all: an HTTP request.
        (
            false,
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            "invalid length of startup packet",
        ),
        // A protocol version nobody speaks.
        (
            false,
            startup_packet(0x1234_5678, &[("user", "postgres")]),
            "unsupported frontend protocol 4660.22136",
        ),
        (false, unterminated, "invalid startup packet layout"),
        (
            true,
            frame(b'z', b"whatever"),
            "invalid frontend message type 122 ('z')",
        ),
        (true, lying, "invalid Query message"),
        (true, frame(b'B', &bind), "invalid Bind message"),
        // A length below 4.
        (true, b"Q\0\0\0\x02".to_vec(), "invalid message length 2"),
        // An oversized message is refused from its header alone: the body
        // is never sent, so the answer cannot come from buffering it.
        (
            true,
            b"Q\x7f\xff\xff\xf0".to_vec(),
            "exceeds the maximum message size of 268435456 bytes",
        ),
    ];
    for (login, bytes, expected) in cases {
        assert_refused(&harness, login, &bytes, "08P01", expected).await;
    }

    // The session opened before is untouched, transaction and all.
    assert_eq!(
        support::scalar(&bystander, "select count(*) from kept").await,
        "1"
    );
    bystander.batch_execute("commit").await.expect("commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negotiation_requests() {
    let harness = Harness::start().await;

    // SSLRequest and GSSENCRequest are declined with 'N'; the startup then
    // goes on in the clear.
    let mut client = RawClient::connect(harness.proxy).await;
    let mut ssl = 8_i32.to_be_bytes().to_vec();
    ssl.extend_from_slice(&80_877_103_i32.to_be_bytes());
    client.send(&ssl).await;
    assert_eq!(client.byte().await, b'N');
    let mut gss = 8_i32.to_be_bytes().to_vec();
    gss.extend_from_slice(&80_877_104_i32.to_be_bytes());
    client.send(&gss).await;
    assert_eq!(client.byte().await, b'N');

    // Protocol 3.2 with an unknown protocol option: the proxy answers
    // NegotiateProtocolVersion (3.0, that option) and carries on.
    client
        .send(&startup_packet(
            (3 << 16) | 2,
            &[
                ("user", "postgres"),
                ("_pq_.frobnicate", "on"),
                ("application_name", "negotiator"),
            ],
        ))
        .await;
    let greeting = client.until_ready().await;
    let negotiate = greeting.first().expect("first message");
    assert_eq!(negotiate.tag, b'v');
    assert_eq!(&negotiate.body[..4], &0_i32.to_be_bytes());
    assert_eq!(&negotiate.body[4..8], &1_i32.to_be_bytes());
    assert_eq!(&negotiate.body[8..], b"_pq_.frobnicate\0");
    assert!(greeting.iter().any(|m| m.tag == b'R'));
    client
        .send(&query("select current_setting('application_name')"))
        .await;
    let reply = client.until_ready().await;
    let row = reply.iter().find(|m| m.tag == b'D').expect("row");
    assert!(row.body.ends_with(b"negotiator"));

    // No user name: refused like PostgreSQL does.
    assert_refused(
        &harness,
        false,
        &startup_packet(196_608, &[("database", "postgres")]),
        "28000",
        "no PostgreSQL user name specified",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_client_conn_is_enforced() {
    let harness = Harness::start_with(throwaway_pg::Options::default(), |config| {
        config.max_client_conn = 2
    })
    .await;
    let (first, _) = harness.connect().await;
    let (second, _) = harness.connect().await;
    let err = tokio_postgres::connect(&harness.proxy_conn_str(), tokio_postgres::NoTls)
        .await
        .err()
        .expect("third session refused");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS)
    );
    assert_eq!(support::scalar(&first, "select 1").await, "1");
    drop(second);
    support::eventually(
        std::time::Duration::from_secs(5),
        "a freed slot is reusable",
        || async {
            tokio_postgres::connect(&harness.proxy_conn_str(), tokio_postgres::NoTls)
                .await
                .is_ok()
        },
    )
    .await;
}
