//! Agent-to-agent handshakes over real TCP on loopback, with SVIDs signed by
//! the operator's own CA code: who gets authenticated, who is refused, and
//! that neither side panics on garbage.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair};
use tessera_agent::datapath::Authenticated;
use tessera_agent::mesh::handshake::{self, Credentials, HandshakeError, Initiate};
use tessera_agent::svid::store::{Bundles, X509Svid};
use tessera_api::spiffe::{SpiffeId, TrustDomain};
use tessera_operator::ca::authority::{self, TrustDomainCa};
use time::OffsetDateTime;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

struct Domain {
    ca: TrustDomainCa,
    id: String,
    root_der: Vec<u8>,
}

fn domain(name: &str) -> Domain {
    let td: TrustDomain = name.parse().unwrap();
    let now = OffsetDateTime::now_utc() - time::Duration::hours(3);
    let root = authority::new_root(&td, now, Duration::from_secs(24 * 3600)).unwrap();
    Domain {
        root_der: root.cert_der.clone(),
        ca: TrustDomainCa::in_memory(vec![root]),
        id: td.id().to_string(),
    }
}

impl Domain {
    /// An SVID for `path`, valid from `start` for `ttl`.
    fn svid_at(&self, path: &str, start: OffsetDateTime, ttl: Duration) -> X509Svid {
        let id: SpiffeId = format!("{}{path}", self.id).parse().unwrap();
        let key = KeyPair::generate().unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .unwrap();
        let (leaf, _) =
            tessera_operator::ca::signer::sign_x509_svid(&self.ca, &id, csr.der(), ttl, start)
                .unwrap();
        X509Svid {
            spiffe_id: id.to_string(),
            chain_der: leaf,
            key_der: key.serialize_der(),
            hint: String::new(),
        }
    }

    fn svid(&self, path: &str) -> X509Svid {
        self.svid_at(path, OffsetDateTime::now_utc(), Duration::from_secs(3600))
    }

    fn bundles(&self) -> Bundles {
        Bundles {
            trust_domain_id: self.id.clone(),
            own_der: self.root_der.clone(),
            ..Default::default()
        }
    }
}

/// Runs one responder on a fresh port; `admit` as given.
async fn responder(
    creds: Credentials,
    admit: impl FnOnce(&handshake::Knock<'_>) -> Result<(), handshake::Refusal> + Send + 'static,
) -> (
    SocketAddr,
    tokio::task::JoinHandle<Result<Authenticated, HandshakeError>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        handshake::respond(&creds, tcp, admit, |_| true).await
    });
    (addr, task)
}

fn ask<'a>(local: &'a str, remote: &'a str) -> Initiate<'a> {
    Initiate {
        local,
        remote,
        local_node: "node-a",
        remote_node: "node-b",
        source: Some([127, 0, 0, 1].into()),
        vouch: &[],
    }
}

fn leaf_not_after(svid: &X509Svid) -> i64 {
    let (_, cert) = x509_parser::parse_x509_certificate(&svid.chain_der).unwrap();
    cert.validity().not_after.timestamp()
}

#[tokio::test]
async fn one_handshake_authenticates_both_sides_until_the_earlier_not_after() {
    let td = domain("a.test");
    let web = td.svid("/ns/shop/sa/web");
    // The responder's SVID ends sooner: that is the expiry on both sides.
    let db = td.svid_at(
        "/ns/shop/sa/db",
        OffsetDateTime::now_utc(),
        Duration::from_secs(1800),
    );
    let other = td.svid("/ns/shop/sa/cache");
    let client = Credentials::build([&web], &td.bundles()).unwrap();
    let server = Credentials::build([&db, &other], &td.bundles()).unwrap();
    assert!(server.holds(&db.spiffe_id) && !server.holds(&web.spiffe_id));

    let (addr, task) = responder(server, |knock| {
        assert_eq!(knock.remote_node, "node-a");
        assert!(knock.from.ip().is_loopback());
        Ok(())
    })
    .await;
    let mine = handshake::initiate(&client, addr, &ask(&web.spiffe_id, &db.spiffe_id))
        .await
        .unwrap();
    let theirs = task.await.unwrap().unwrap();
    let expiry = leaf_not_after(&db);
    assert!(expiry < leaf_not_after(&web));
    assert_eq!(
        mine,
        Authenticated {
            local: web.spiffe_id.clone(),
            remote: db.spiffe_id.clone(),
            remote_node: "node-b".into(),
            not_after: expiry,
        }
    );
    assert_eq!(
        theirs,
        Authenticated {
            local: db.spiffe_id.clone(),
            remote: web.spiffe_id.clone(),
            remote_node: "node-a".into(),
            not_after: expiry,
        }
    );
}

/// Rebuilt credentials present a rotated SVID and follow changed bundles,
/// whatever they reuse from the previous build.
#[tokio::test]
async fn rebuilt_credentials_use_the_new_svid_and_the_new_bundles() {
    let td = domain("a.test");
    let other_td = domain("b.test");
    let old = td.svid_at(
        "/ns/shop/sa/web",
        OffsetDateTime::now_utc(),
        Duration::from_secs(1800),
    );
    let new = td.svid("/ns/shop/sa/web");
    let cache = td.svid("/ns/shop/sa/cache");
    let db = td.svid("/ns/shop/sa/db");
    let server = Credentials::build([&db], &td.bundles()).unwrap();
    let first = Credentials::build([&old, &cache], &td.bundles()).unwrap();
    let rotated = Credentials::rebuild(Some(&first), [&new, &cache], &td.bundles()).unwrap();
    assert_eq!(
        rotated.not_after(&new.spiffe_id),
        Some(leaf_not_after(&new))
    );
    for (creds, svid) in [(&rotated, &new), (&rotated, &cache)] {
        let (addr, task) = responder(server.clone(), |_| Ok(())).await;
        handshake::initiate(creds, addr, &ask(&svid.spiffe_id, &db.spiffe_id))
            .await
            .unwrap();
        let theirs = task.await.unwrap().unwrap();
        assert_eq!(theirs.remote, svid.spiffe_id);
        assert_eq!(
            theirs.not_after,
            leaf_not_after(svid).min(leaf_not_after(&db))
        );
    }
    // Bundles that no longer hold a.test's CA: db is not trusted any more.
    let moved = Credentials::rebuild(Some(&rotated), [&new], &other_td.bundles()).unwrap();
    let (addr, task) = responder(server.clone(), |_| Ok(())).await;
    let out = handshake::initiate(&moved, addr, &ask(&new.spiffe_id, &db.spiffe_id)).await;
    assert!(out.is_err(), "{out:?}");
    let _ = task.await;
}

/// The responder records before it answers: an initiator hears success
/// only once the responder holds the result (here after three tries), and
/// a refusal when the responder cannot record it within RECORD_WAIT.
#[tokio::test]
async fn the_responder_answers_only_what_it_recorded() {
    let td = domain("a.test");
    let web = td.svid("/ns/shop/sa/web");
    let db = td.svid("/ns/shop/sa/db");
    let client = Credentials::build([&web], &td.bundles()).unwrap();
    let server = Credentials::build([&db], &td.bundles()).unwrap();
    for recordable_after in [Some(3usize), None] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tries = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = tries.clone();
        let server = server.clone();
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            handshake::respond(
                &server,
                tcp,
                |_| Ok(()),
                |_| {
                    let n = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    recordable_after.is_some_and(|after| n >= after)
                },
            )
            .await
        });
        let started = std::time::Instant::now();
        let mine = handshake::initiate(&client, addr, &ask(&web.spiffe_id, &db.spiffe_id)).await;
        let theirs = task.await.unwrap();
        let tries = tries.load(std::sync::atomic::Ordering::SeqCst);
        match recordable_after {
            Some(after) => {
                assert!(mine.is_ok() && theirs.is_ok(), "{mine:?} / {theirs:?}");
                assert_eq!(tries, after);
            }
            None => {
                let err = mine.unwrap_err().to_string();
                assert!(err.contains("cannot record"), "{err}");
                assert!(matches!(theirs, Err(HandshakeError::Refused { .. })));
                assert!(started.elapsed() >= handshake::RECORD_WAIT);
            }
        }
    }
}

#[tokio::test]
async fn a_responder_without_the_asked_identity_fails_the_handshake() {
    let td = domain("a.test");
    let web = td.svid("/ns/shop/sa/web");
    let db = td.svid("/ns/shop/sa/db");
    let client = Credentials::build([&web], &td.bundles()).unwrap();
    let server = Credentials::build([&db], &td.bundles()).unwrap();
    let (addr, task) = responder(server, |_| Ok(())).await;
    // Asking for an identity the responder does not hold (say, the pod
    // moved away) gets no certificate at all, so nothing is recorded.
    let wanted = format!("{}/ns/shop/sa/cache", td.id);
    let err = handshake::initiate(&client, addr, &ask(&web.spiffe_id, &wanted))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            HandshakeError::Io {
                what: "TLS handshake",
                ..
            }
        ),
        "{err}"
    );
    assert!(task.await.unwrap().is_err());
    // And the initiator cannot ask on behalf of an identity it does not hold.
    let err = handshake::initiate(&client, addr, &ask(&db.spiffe_id, &db.spiffe_id))
        .await
        .unwrap_err();
    assert!(matches!(err, HandshakeError::NoCredential(_)), "{err}");
}

#[tokio::test]
async fn certificates_of_an_untrusted_domain_are_refused_both_ways() {
    let td = domain("a.test");
    let rogue = domain("a.test"); // same name, another CA
    let web = td.svid("/ns/shop/sa/web");
    let db = td.svid("/ns/shop/sa/db");
    let fake_db = rogue.svid("/ns/shop/sa/db");
    let fake_web = rogue.svid("/ns/shop/sa/web");

    // A responder with a forged db SVID: the initiator refuses it.
    let client = Credentials::build([&web], &td.bundles()).unwrap();
    let forged = Credentials::build([&fake_db], &td.bundles()).unwrap();
    let (addr, task) = responder(forged, |_| Ok(())).await;
    let err = handshake::initiate(&client, addr, &ask(&web.spiffe_id, &db.spiffe_id))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("does not chain"), "{err}");
    assert!(task.await.unwrap().is_err());

    // An initiator with a forged web SVID: the responder refuses it.
    let server = Credentials::build([&db], &td.bundles()).unwrap();
    let forger = Credentials::build([&fake_web], &td.bundles()).unwrap();
    let (addr, task) = responder(server, |_| Ok(())).await;
    assert!(
        handshake::initiate(&forger, addr, &ask(&web.spiffe_id, &db.spiffe_id))
            .await
            .is_err()
    );
    let err = task.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("does not chain"), "{err}");
}

#[tokio::test]
async fn a_federated_peer_is_checked_against_its_own_domains_bundle() {
    let td = domain("a.test");
    let other = domain("b.test");
    let db = td.svid("/ns/shop/sa/db");
    let partner = other.svid("/partner");
    let mut bundles = td.bundles();
    let server_without = Credentials::build([&db], &bundles).unwrap();
    bundles
        .federated_der
        .insert(other.id.clone(), other.root_der.clone());
    let server = Credentials::build([&db], &bundles).unwrap();
    let mut theirs = other.bundles();
    theirs
        .federated_der
        .insert(td.id.clone(), td.root_der.clone());
    let client = Credentials::build([&partner], &theirs).unwrap();

    let (addr, task) = responder(server, |_| Ok(())).await;
    handshake::initiate(&client, addr, &ask(&partner.spiffe_id, &db.spiffe_id))
        .await
        .unwrap();
    assert_eq!(task.await.unwrap().unwrap().remote, partner.spiffe_id);

    let (addr, task) = responder(server_without, |_| Ok(())).await;
    assert!(
        handshake::initiate(&client, addr, &ask(&partner.spiffe_id, &db.spiffe_id))
            .await
            .is_err()
    );
    let err = task.await.unwrap().unwrap_err();
    assert!(
        err.to_string()
            .contains("no trust bundle for spiffe://b.test"),
        "{err}"
    );

    // A b.test certificate is never accepted on a.test's bundle, even when
    // it names an a.test ID: bundles are not merged.
    let mut mixed = other.svid("/x");
    let impostor_id = format!("{}/ns/shop/sa/web", td.id);
    mixed.spiffe_id = impostor_id;
    assert!(matches!(
        Credentials::build([&mixed], &theirs),
        Err(HandshakeError::Material(_))
    ));
}

#[tokio::test]
async fn expired_svids_and_refused_nodes_authenticate_nothing() {
    let td = domain("a.test");
    let db = td.svid("/ns/shop/sa/db");
    let old = td.svid_at(
        "/ns/shop/sa/web",
        OffsetDateTime::now_utc() - time::Duration::hours(2),
        Duration::from_secs(3600),
    );
    let web = td.svid("/ns/shop/sa/web");
    let server = Credentials::build([&db], &td.bundles()).unwrap();

    let expired = Credentials::build([&old], &td.bundles()).unwrap();
    let (addr, task) = responder(server.clone(), |_| Ok(())).await;
    assert!(
        handshake::initiate(&expired, addr, &ask(&web.spiffe_id, &db.spiffe_id))
            .await
            .is_err()
    );
    let err = task.await.unwrap().unwrap_err();
    assert!(err.to_string().to_lowercase().contains("expired"), "{err}");

    let client = Credentials::build([&web], &td.bundles()).unwrap();
    let (addr, task) = responder(server, |knock| {
        Err(handshake::Refusal::NotNodeAddress {
            from: knock.from.ip(),
            node: knock.remote_node.to_owned(),
        })
    })
    .await;
    let err = handshake::initiate(&client, addr, &ask(&web.spiffe_id, &db.spiffe_id))
        .await
        .unwrap_err();
    match err {
        HandshakeError::Refused { reason, .. } => {
            assert!(
                reason.contains("127.0.0.1 is not an address of node node-a"),
                "{reason}"
            )
        }
        other => panic!("{other}"),
    }
    assert!(matches!(
        task.await.unwrap(),
        Err(HandshakeError::Refused { .. })
    ));
}

#[tokio::test]
async fn garbage_and_old_tls_get_errors_not_panics() {
    let td = domain("a.test");
    let db = td.svid("/ns/shop/sa/db");
    let server = Credentials::build([&db], &td.bundles()).unwrap();
    for junk in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0xff, 0xff, 0x01][..],
        &[][..],
    ] {
        let (addr, task) = responder(server.clone(), |_| Ok(())).await;
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(junk).await.unwrap();
        drop(tcp);
        assert!(task.await.unwrap().is_err());
    }

    // TLS 1.2 is not spoken, checked with a real OpenSSL client.
    let (addr, task) = responder(server, |_| Ok(())).await;
    let out = tokio::process::Command::new("openssl")
        .args(["s_client", "-tls1_2", "-connect", &addr.to_string()])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("openssl (installed by cargo xtask test)");
    assert!(!out.status.success());
    let err = task.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("TLS handshake"), "{err}");

    // Unusable material is an error when the configuration is built.
    let mut broken = db.clone();
    broken.key_der = b"not a key".to_vec();
    assert!(matches!(
        Credentials::build([&broken], &td.bundles()),
        Err(HandshakeError::Material(_))
    ));
    broken = db.clone();
    broken.chain_der.truncate(20);
    assert!(matches!(
        Credentials::build([&broken], &td.bundles()),
        Err(HandshakeError::Material(_))
    ));
    let mut bad_bundle = td.bundles();
    bad_bundle.own_der = vec![0x30, 0x03, 1, 2, 3];
    assert!(matches!(
        Credentials::build([&db], &bad_bundle),
        Err(HandshakeError::Material(_))
    ));
}

#[test]
fn server_names_are_dns_names_one_per_identity() {
    let a = handshake::server_name("spiffe://a.test/ns/shop/sa/web");
    let b = handshake::server_name("spiffe://a.test/ns/shop/sa/db");
    assert_ne!(a, b);
    assert!(a.len() < 64 + 16 && a.ends_with(".tessera.invalid"));
    assert!(rustls::pki_types::ServerName::try_from(a.as_str()).is_ok());
}

#[test]
fn a_ca_leaving_the_bundles_is_noticed() {
    let td = domain("a.test");
    let other = domain("b.test");
    let old = td.bundles();
    assert!(!handshake::authorities_removed(&old, &old));
    // Adding a root or a federated domain removes nothing.
    let mut more = old.clone();
    more.own_der.extend_from_slice(&other.root_der);
    more.federated_der
        .insert(other.id.clone(), other.root_der.clone());
    assert!(!handshake::authorities_removed(&old, &more));
    // Dropping the federated domain, or the old root, does.
    assert!(handshake::authorities_removed(&more, &old));
    let mut rotated = old.clone();
    rotated.own_der = other.root_der.clone();
    assert!(handshake::authorities_removed(&old, &rotated));
    // The same certificate under another trust domain is not the same CA.
    let mut moved = old.clone();
    moved.trust_domain_id = other.id.clone();
    assert!(handshake::authorities_removed(&old, &moved));
    // Unreadable bundles fail closed.
    let mut broken = old.clone();
    broken.own_der.truncate(10);
    assert!(handshake::authorities_removed(&old, &broken));
}

/// The addresses an initiator vouches for reach the responder's `admit`
/// as sent (both families, several pods); without any, the hello is the
/// first version's, which every responder reads.
#[tokio::test]
async fn vouched_addresses_reach_the_responder_intact() {
    use std::net::IpAddr;
    use std::sync::Arc;
    let td = domain("a.test");
    let (web, db) = (td.svid("/ns/shop/sa/web"), td.svid("/ns/shop/sa/db"));
    let client = Credentials::build([&web], &td.bundles()).unwrap();
    let server = Credentials::build([&db], &td.bundles()).unwrap();
    let ips =
        |list: &[&str]| -> Arc<[IpAddr]> { list.iter().map(|i| i.parse().unwrap()).collect() };
    let vouch: Vec<(Arc<str>, Arc<[IpAddr]>)> = vec![
        (
            "0b9a6f4e-1111-4c1e-9d7e-2f00aa000001".into(),
            ips(&["198.18.1.10", "fd18:7e55::1:10"]),
        ),
        (
            "0b9a6f4e-1111-4c1e-9d7e-2f00aa000002".into(),
            ips(&["198.18.1.11"]),
        ),
    ];
    for sent in [vouch.clone(), Vec::new()] {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (addr, task) = responder(server.clone(), move |knock| {
            let got: Vec<(String, Vec<IpAddr>)> = knock
                .vouched
                .iter()
                .map(|v| (v.uid.clone(), v.ips.clone()))
                .collect();
            let _ = tx.send(got);
            Ok(())
        })
        .await;
        let mut asked = ask(&web.spiffe_id, &db.spiffe_id);
        asked.vouch = &sent;
        handshake::initiate(&client, addr, &asked).await.unwrap();
        task.await.unwrap().unwrap();
        let expected: Vec<(String, Vec<IpAddr>)> = sent
            .iter()
            .map(|(u, i)| (u.to_string(), i.to_vec()))
            .collect();
        assert_eq!(rx.await.unwrap(), expected);
    }
}

/// A responder that serves channels and plain connections alike, as the
/// agents' handshake server does; counts the handshakes it answered.
async fn channel_responder(
    creds: Credentials,
) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tessera_agent::mesh::channel;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = answered.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, from) = listener.accept().await.unwrap();
            let (creds, count) = (creds.clone(), count.clone());
            tokio::spawn(async move {
                let answer = move |stream: tessera_agent::mesh::channel::Stream| {
                    let (creds, count) = (creds.clone(), count.clone());
                    async move {
                        if handshake::respond_on(&creds, stream, from, |_| Ok(()), |_| true)
                            .await
                            .is_ok()
                        {
                            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                };
                if channel::is_channel(&tcp).await {
                    channel::serve(tcp, answer).await;
                }
            });
        }
    });
    (addr, answered)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_pairs_authenticate_at_once_over_one_channel_each_with_its_own_tls_session() {
    let td = domain("a.test");
    let db = td.svid("/ns/shop/sa/db");
    let webs: Vec<X509Svid> = (0..20)
        .map(|i| td.svid(&format!("/ns/shop/sa/web-{i}")))
        .collect();
    let client = Credentials::build(&webs, &td.bundles()).unwrap();
    let server = Credentials::build([&db], &td.bundles()).unwrap();
    let (addr, answered) = channel_responder(server).await;
    let channels = std::sync::Arc::new(tessera_agent::mesh::channel::Channels::default());
    let mut tasks = Vec::new();
    // More at once than a channel carries (MAX_STREAMS): the rest wait.
    let rounds = tessera_agent::mesh::channel::MAX_STREAMS / webs.len() + 2;
    for round in 0..rounds {
        for web in &webs {
            let (client, channels, local, remote) = (
                client.clone(),
                channels.clone(),
                web.spiffe_id.clone(),
                db.spiffe_id.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let auth = channels
                    .authenticate(&client, addr, &ask(&local, &remote))
                    .await;
                (round, local, auth)
            }));
        }
    }
    for task in tasks {
        let (round, local, auth) = task.await.unwrap();
        let auth = auth.unwrap_or_else(|e| panic!("round {round}, {local}: {e}"));
        assert_eq!(
            (auth.local.as_str(), auth.remote.as_str()),
            (local.as_str(), db.spiffe_id.as_str())
        );
    }
    assert_eq!(
        answered.load(std::sync::atomic::Ordering::SeqCst),
        rounds * webs.len()
    );

    // A pair the responder cannot authenticate fails alone: the others on
    // the same channel go on.
    let stranger = domain("b.test").svid("/ns/shop/sa/web");
    let outsider = Credentials::build([&stranger], &domain("b.test").bundles()).unwrap();
    let refused = channels
        .authenticate(&outsider, addr, &ask(&stranger.spiffe_id, &db.spiffe_id))
        .await;
    assert!(refused.is_err(), "a foreign SVID must not authenticate");
    let again = channels
        .authenticate(&client, addr, &ask(&webs[0].spiffe_id, &db.spiffe_id))
        .await;
    assert!(again.is_ok(), "{again:?}");
}
