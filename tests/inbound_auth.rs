//! Invariant 1: nothing unverified gets in. Every check of protocol.md §1.3 against the running
//! router, each answered with its status and reason, and never with a reply.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use loadtest::keys::{SigningKey, connector_claims, now_secs};
use serde_json::json;

#[tokio::test]
async fn every_inbound_check_refuses_with_its_status_and_no_reply() {
    let (mock, router) = start_counting("").await;
    let client = http();
    let prod = router.callback_url("teams_prod");
    let single = router.callback_url("teams_single");
    let key = mock.signing_key();
    let service_url = mock.service_url();
    let claims = || connector_claims(APP_ID, &service_url);

    // A key the mock never publishes, under the published key's kid: the signature cannot verify.
    let impostor = SigningKey::generate(&key.kid, &["msteams"]);
    let unknown_kid = SigningKey::generate("never-published", &["msteams"]);

    let mut expired = claims();
    expired["exp"] = json!(now_secs() - 301 - 60);
    expired["nbf"] = json!(now_secs() - 3600);
    let mut not_yet = claims();
    not_yet["nbf"] = json!(now_secs() + 301 + 60);
    let mut wrong_issuer = claims();
    wrong_issuer["iss"] = json!("https://sts.windows.net/d6d49420-f39b-4df7-a1dc-d59a935871db/");
    let mut other_service = claims();
    other_service["serviceurl"] = json!("https://smba.trafficmanager.net/emea/");
    let mut no_aud = claims();
    no_aud.as_object_mut().unwrap().remove("aud");

    let cases: Vec<(&str, &str, Option<String>, u16, &str)> = vec![
        (
            "missing Authorization",
            "c-none",
            None,
            401,
            "missing_token",
        ),
        (
            "not a JWT",
            "c-garbage",
            Some("not-a-jwt".into()),
            401,
            "malformed_token",
        ),
        (
            "bad signature",
            "c-sig",
            Some(impostor.sign(&claims())),
            401,
            "bad_signature",
        ),
        (
            "wrong issuer",
            "c-iss",
            Some(key.sign(&wrong_issuer)),
            401,
            "bad_issuer",
        ),
        (
            "wrong audience",
            "c-aud",
            Some(key.sign(&connector_claims("someone-else", &service_url))),
            401,
            "bad_audience",
        ),
        (
            "no audience",
            "c-noaud",
            Some(key.sign(&no_aud)),
            401,
            "malformed_token",
        ),
        (
            "expired beyond the skew",
            "c-exp",
            Some(key.sign(&expired)),
            401,
            "expired",
        ),
        (
            "not yet valid beyond the skew",
            "c-nbf",
            Some(key.sign(&not_yet)),
            401,
            "not_yet_valid",
        ),
        (
            "alg none",
            "c-none-alg",
            Some(key.unsigned_alg_none(&claims())),
            401,
            "unsupported_algorithm",
        ),
        (
            "HS256 with the public key",
            "c-hs",
            Some(key.sign_hs256_with_public_key(&claims())),
            401,
            "unsupported_algorithm",
        ),
        (
            "unknown kid",
            "c-kid",
            Some(unknown_kid.sign(&claims())),
            401,
            "unknown_key",
        ),
        (
            "serviceurl mismatch",
            "c-surl",
            Some(key.sign(&other_service)),
            401,
            "serviceurl_mismatch",
        ),
    ];
    for (what, conversation, token, status, reason) in &cases {
        let activity = personal_message(&mock, conversation, "1", "hello");
        let (got, body) = post(&client, &prod, token.as_deref(), &activity).await;
        assert_eq!(got, *status, "{what}: {body}");
        assert!(
            body.contains(reason),
            "{what}: body {body} lacks reason {reason}"
        );
    }

    // Tenant mismatch on a single-tenant integration: 403.
    let mut other_tenant = personal_message(&mock, "c-tenant", "1", "hello");
    other_tenant["channelData"]["tenant"]["id"] = json!("00000000-0000-0000-0000-000000000000");
    let token = key.sign(&connector_claims(SINGLE_APP_ID, &service_url));
    let (got, body) = post(&client, &single, Some(&token), &other_tenant).await;
    assert_eq!(got, 403, "{body}");
    assert!(body.contains("tenant_mismatch"));
    // ... and the right tenant is let in.
    let same_tenant = personal_message(&mock, "c-tenant-ok", "1", "hello");
    assert_eq!(
        post(&client, &single, Some(&token), &same_tenant).await.0,
        200
    );

    // A token for one bot does not open another bot's door, even when it is cached.
    let prod_token = mock.token_for(APP_ID);
    let ok = personal_message(&mock, "c-ok", "1", "hello");
    assert_eq!(post(&client, &prod, Some(&prod_token), &ok).await.0, 200);
    let (got, body) = post(&client, &single, Some(&prod_token), &same_tenant).await;
    assert_eq!(got, 401, "{body}");

    let replies = mock.wait_for_activities(2, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let replies = if replies.len() == 2 {
        mock.activities()
    } else {
        replies
    };
    let conversations: Vec<_> = replies.iter().map(|r| r.conversation_id.as_str()).collect();
    assert_eq!(
        conversations.len(),
        2,
        "only the verified activities are answered: {conversations:?}"
    );
    assert!(conversations.contains(&"c-tenant-ok") && conversations.contains(&"c-ok"));

    let scrape = metrics(&router).await;
    for (what, _, _, _, reason) in &cases {
        assert!(
            metric_sum(
                &scrape,
                "teams_router_activities_rejected_total",
                &[&format!("reason=\"{reason}\"")]
            ) >= 1.0,
            "{what}: no rejection counted for {reason}"
        );
    }
    assert_eq!(
        metric_sum(
            &scrape,
            "teams_router_activities_rejected_total",
            &["reason=\"tenant_mismatch\""]
        ),
        1.0
    );
}

#[tokio::test]
async fn a_key_without_the_channel_endorsement_is_refused() {
    let mock = loadtest::mock::MockMicrosoft::start().await;
    mock.register_app(APP_ID, APP_SECRET, None);
    // Microsoft publishes a key that endorses only Web Chat, and one without any endorsement.
    let webchat_only = Arc::new(SigningKey::generate("webchat-key", &["webchat"]));
    let unendorsed = Arc::new(SigningKey::generate("unendorsed-key", &[]));
    let teams_key = mock.signing_key();
    mock.rotate_to(Arc::clone(&unendorsed));
    mock.rotate_to(Arc::clone(&webchat_only));
    let router = teams_router::testkit::TestRouter::start(&config(&mock, ""))
        .await
        .unwrap();
    let client = http();
    let url = router.callback_url("teams_prod");
    let claims = connector_claims(APP_ID, &mock.service_url());

    let activity = personal_message(&mock, "c-endorse", "1", "hello");
    let (status, body) = post(&client, &url, Some(&webchat_only.sign(&claims)), &activity).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("missing_endorsement"), "{body}");
    // A key without an endorsements list endorses no channel.
    let (status, body) = post(&client, &url, Some(&unendorsed.sign(&claims)), &activity).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("missing_endorsement"), "{body}");
    // The same activity signed by the key that endorses msteams is accepted.
    let (status, body) = post(&client, &url, Some(&teams_key.sign(&claims)), &activity).await;
    assert_eq!(status, 200, "{body}");

    // A Teams integration takes msteams only: a Web Chat activity is refused, even signed by
    // a key that endorses Web Chat, unless the integration lists the channel.
    let mut webchat = personal_message(&mock, "c-webchat", "2", "hello");
    webchat["channelId"] = "webchat".into();
    let (status, body) = post(&client, &url, Some(&webchat_only.sign(&claims)), &webchat).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("channel_not_allowed"), "{body}");
    let (status, body) = post(&client, &router.callback_url("teams_dev"), None, &webchat).await;
    assert_eq!(status, 401, "development mode too: {body}");
    let listing = config(
        &mock,
        &format!(
            "[[integrations]]\nid = \"teams_webchat\"\nbotId = \"echo\"\nbotFrameworkAppId = \"{APP_ID}\"\nbotFrameworkAppSecret = \"{APP_SECRET}\"\nchannels = [\"webchat\"]\n"
        ),
    );
    let listed = teams_router::testkit::TestRouter::start(&listing)
        .await
        .unwrap();
    let (status, body) = post(
        &client,
        &listed.callback_url("teams_webchat"),
        Some(&webchat_only.sign(&claims)),
        &webchat,
    )
    .await;
    assert_eq!(status, 200, "a listed channel is taken: {body}");
}

#[tokio::test]
async fn a_rotated_key_is_picked_up_after_one_refresh() {
    let (mock, router) = start("").await;
    let client = http();
    let url = router.callback_url("teams_prod");
    let claims = connector_claims(APP_ID, &mock.service_url());
    assert_eq!(
        post(
            &client,
            &url,
            Some(&mock.token_for(APP_ID)),
            &personal_message(&mock, "c1", "1", "a")
        )
        .await
        .0,
        200
    );

    // A kid Microsoft has not published yet: refused after a refresh finds nothing.
    let next = Arc::new(SigningKey::generate("key-2", &["msteams"]));
    let token = next.sign(&claims);
    let (status, body) = post(
        &client,
        &url,
        Some(&token),
        &personal_message(&mock, "c1", "2", "b"),
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("unknown_key"));

    // Microsoft rotates: the same kid is now published and the token is accepted.
    mock.rotate_to(Arc::clone(&next));
    let before = mock.metadata_requests();
    let (status, body) = post(
        &client,
        &url,
        Some(&token),
        &personal_message(&mock, "c1", "3", "c"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(mock.metadata_requests() - before, 1, "exactly one refresh");

    // Known kids and cached tokens cost no refresh.
    for i in 4..10 {
        let id = i.to_string();
        assert_eq!(
            post(
                &client,
                &url,
                Some(&token),
                &personal_message(&mock, "c1", &id, "d")
            )
            .await
            .0,
            200
        );
    }
    assert_eq!(mock.metadata_requests() - before, 1);
}

#[tokio::test]
async fn discovery_down_with_no_cached_key_is_503_until_it_comes_back() {
    let mock = loadtest::mock::MockMicrosoft::start().await;
    mock.register_app(APP_ID, APP_SECRET, None);
    mock.set_openid_available(false);
    let router = teams_router::testkit::TestRouter::start(&config(&mock, ""))
        .await
        .unwrap();
    let client = http();
    let url = router.callback_url("teams_prod");
    let token = mock.token_for(APP_ID);

    let ready = client.get(router.ops_url("/readyz")).send().await.unwrap();
    assert_eq!(
        ready.status().as_u16(),
        503,
        "not ready without signing keys"
    );

    let response = client
        .post(&url)
        .bearer_auth(&token)
        .json(&personal_message(&mock, "c1", "1", "hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 503);
    assert!(response.headers().get("retry-after").is_some());
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("discovery_unavailable")
    );

    mock.set_openid_available(true);
    let (status, body) = post(
        &client,
        &url,
        Some(&token),
        &personal_message(&mock, "c1", "2", "hello"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let replies = mock.wait_for_activities(1, Duration::from_secs(10)).await;
    assert_eq!(replies.len(), 1);
    let ready = client.get(router.ops_url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 200);

    // Once keys are cached, an outage no longer matters.
    mock.set_openid_available(false);
    let (status, _) = post(
        &client,
        &url,
        Some(&token),
        &personal_message(&mock, "c1", "3", "hello"),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn development_mode_takes_unsigned_loopback_activities_and_replies_unauthenticated() {
    let (mock, router) = start("").await;
    mock.set_connector_requires_auth(false);
    let client = http();
    let activity = personal_message(&mock, "dev-1", "1", "hi there");
    let (status, body) = post(&client, &router.callback_url("teams_dev"), None, &activity).await;
    assert_eq!(status, 200, "{body}");
    let replies = mock.wait_for_activities(1, Duration::from_secs(10)).await;
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].text(), "echo: hi there");
    assert_eq!(
        replies[0].authorization, None,
        "no token leaves in development mode"
    );
    assert_eq!(mock.token_requests(), 0);
}

/// Issue 15, point 4: development mode is what the config says, not what a missing App ID
/// implies. An integration created through the API without credentials accepts nothing (even from
/// loopback, which is every client behind a same-host proxy), and a development integration is
/// refused outright on a listener that is not loopback.
#[tokio::test]
async fn only_a_config_development_integration_takes_unsigned_activities() {
    let key = "dev-mode-test-key";
    let (mock, router) = start(&format!(
        "[[accounts]]\nid = \"ops\"\napi_key = \"{key}\"\n"
    ))
    .await;
    mock.set_connector_requires_auth(false);
    let client = http();
    let created: serde_json::Value = client
        .post(format!(
            "{}/api/v1/integration/teams/create",
            router.base_url()
        ))
        .bearer_auth(key)
        .json(&json!({"botId": "echo", "name": "no credentials"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().expect("created").to_owned();
    let activity = personal_message(&mock, "nocred-1", "1", "let me in");
    let (status, body) = post(&client, &router.callback_url(&id), None, &activity).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("no_credentials"), "{body}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let fetched = loop {
        let fetched: serde_json::Value = client
            .get(format!(
                "{}/api/v1/integration/teams/{id}/fetch",
                router.base_url()
            ))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if fetched["setupStatus"] != "pending" || std::time::Instant::now() > deadline {
            break fetched;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(fetched["setupStatus"], "failed", "{fetched}");
    // The API cannot ask for development mode.
    let (status, _) = {
        let response = client
            .post(format!(
                "{}/api/v1/integration/teams/create",
                router.base_url()
            ))
            .bearer_auth(key)
            .json(&json!({"botId": "echo", "development": true}))
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), ())
    };
    assert_eq!(status, 400);
    // The configured development integration still works, from loopback.
    let (status, body) = post(&client, &router.callback_url("teams_dev"), None, &activity).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        mock.wait_for_activities(1, Duration::from_secs(10))
            .await
            .len(),
        1
    );
    // What it taught is its own: another integration learned no address from it.
    let proactive = client
        .post(format!(
            "{}/api/v1/integration/teams/teams_prod/message",
            router.base_url()
        ))
        .bearer_auth(key)
        .json(&json!({"conversationId": "nocred-1", "text": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(proactive.status().as_u16(), 404);

    // On a listener every client can reach, a development integration is a startup error.
    let public =
        config(&mock, "").replace("listen = \"127.0.0.1:0\"\n", "listen = \"0.0.0.0:0\"\n");
    let refused = teams_router::testkit::TestRouter::start(&public)
        .await
        .err()
        .expect("development mode on 0.0.0.0 is refused");
    assert!(refused.to_string().contains("development"), "{refused}");
}

/// A token verified (and cached) under a key that Microsoft then retires is verified again at its
/// next use, and refused. The router runs in this process with the runtime paused, so its
/// minute-long key refresh interval passes in virtual time.
#[tokio::test]
async fn a_cached_token_is_refused_once_its_key_is_retired() {
    tokio::time::pause();
    let (mock, router) =
        start_with_env(&[("TEAMS_ROUTER__MICROSOFT__KEY_REFRESH_INTERVAL_SECS", "60")]).await;
    let client = http();
    let url = router.callback_url("teams_prod");
    let token = mock.token_for(APP_ID);
    let (status, body) = post(
        &client,
        &url,
        Some(&token),
        &personal_message(&mock, "c-retired", "1", "a"),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    let retired = mock.signing_key();
    mock.rotate_to(Arc::new(SigningKey::generate("key-after", &["msteams"])));
    mock.retire_key(&retired.kid);
    // The refresher runs every key_refresh_interval_secs.
    tokio::time::sleep(Duration::from_secs(61)).await;
    let (status, body) = post(
        &client,
        &url,
        Some(&token),
        &personal_message(&mock, "c-retired", "2", "b"),
    )
    .await;
    assert_eq!(status, 401, "a token of a retired key: {body}");
    assert!(body.contains("unknown_key"), "{body}");
    // Tokens of the published key keep working.
    let (status, body) = post(
        &client,
        &url,
        Some(&mock.token_for(APP_ID)),
        &personal_message(&mock, "c-retired", "3", "c"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

/// Issue 15, point 16: one process serves integrations of several clouds, each with its own
/// signing keys, token issuer and outbound tokens. A second mock plays the US Government cloud
/// (GCC High): its issuer and scope are the cloud table's; only its hosts are moved to loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integrations_of_different_clouds_are_served_side_by_side() {
    const GOV_APP: &str = "33333333-3333-3333-3333-333333333333";
    const GOV_SECRET: &str = "gov-secret";
    let public = mock().await;
    let gov = loadtest::mock::MockMicrosoft::start().await;
    gov.play_cloud(
        "https://api.botframework.us",
        "https://api.botframework.us/.default",
    );
    gov.register_app(
        GOV_APP,
        GOV_SECRET,
        Some("MicrosoftServices.onmicrosoft.us"),
    );
    let extra = format!(
        r#"
[[integrations]]
id = "teams_gov"
botId = "echo"
botFrameworkAppId = "{GOV_APP}"
botFrameworkAppSecret = "{GOV_SECRET}"
cloud = "usgov-gcch"
cloudSettings = {{ openidMetadataUrl = "{}", loginUrl = "{}" }}
"#,
        gov.openid_metadata_url(),
        gov.login_url()
    );
    let router = teams_router::testkit::TestRouter::start(&config(&public, &extra))
        .await
        .expect("router starts");
    let client = http();

    // The government integration takes the government cloud's tokens, not the public one's.
    let activity = personal_message(&gov, "gov-1", "g1", "hello gov");
    let (status, body) = post(
        &client,
        &router.callback_url("teams_gov"),
        Some(&public.token_for(GOV_APP)),
        &activity,
    )
    .await;
    assert_eq!(status, 401, "a public-cloud token: {body}");
    let (status, body) = post(
        &client,
        &router.callback_url("teams_gov"),
        Some(&gov.token_for(GOV_APP)),
        &activity,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let replies = gov.wait_for_activities(1, Duration::from_secs(10)).await;
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].text(), "echo: hello gov");
    assert!(
        replies[0].authorization.is_some(),
        "with the government cloud's token"
    );

    // The public integration, at the same time, on the public cloud.
    let activity = personal_message(&public, "pub-1", "p1", "hello public");
    let (status, body) = post(
        &client,
        &router.callback_url("teams_prod"),
        Some(&public.token_for(APP_ID)),
        &activity,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        public
            .wait_for_activities(1, Duration::from_secs(10))
            .await
            .len(),
        1
    );
    // A public token is not taken for the government integration, nor the other way round.
    let (status, _) = post(
        &client,
        &router.callback_url("teams_prod"),
        Some(&gov.token_for(APP_ID)),
        &personal_message(&public, "pub-2", "p2", "x"),
    )
    .await;
    assert_eq!(status, 401);
    // Each cloud's token endpoint was asked once, for its own app.
    assert_eq!(gov.token_requests(), 1);
    assert_eq!(public.token_requests(), 1);

    // An unknown cloud is a configuration error.
    let wrong = config(&public, &extra.replace("usgov-gcch", "mars"));
    let refused = teams_router::testkit::TestRouter::start(&wrong)
        .await
        .err()
        .expect("refused");
    assert!(refused.contains("mars"), "{refused}");
}
