//! The notification side over real HTTP: tenants connected by admin consent (the consent URL,
//! Microsoft's redirect to the public callback with a signed, single-use state, the token check
//! in the consenting tenant) and by installing the app, and `tenantPolicy: connected`.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use loadtest::mock::{GRAPH_SCOPE, MockMicrosoft};
use serde_json::{Value, json};
use teams_router::testkit::TestRouter;

const KEY: &str = "notify-api-key-31f0";
/// The master key of routers sharing one Redis (64 hex digits).
const MASTER_KEY_HEX: &str = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";
const PUBLIC_URL: &str = "https://router.example.com";
const CALLBACK: &str = "/api/v1/teams/consent/callback";
const TENANT_B: &str = "b28fdbfd-2b78-4f93-b0f8-8881793f0f8f";
const TENANT_C: &str = "c0ffee00-2b78-4f93-b0f8-8881793f0f8f";
const TENANT_Z: &str = "2e2e2e2e-2b78-4f93-b0f8-8881793f0f8f";

/// The management API on a listener of its own, so the callback is seen on the traffic port.
async fn start_router(consent_ttl_ms: u64) -> (MockMicrosoft, TestRouter, String) {
    let mock = mock().await;
    let config = config(
        &mock,
        &format!(
            "[[accounts]]\nid = \"ops\"\napi_key = \"{KEY}\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\npublic_url = \"{PUBLIC_URL}\"\nconsent_ttl_ms = {consent_ttl_ms}\n"
        ),
    );
    let router = TestRouter::start_counting(
        &config,
        &[("TEAMS_ROUTER__MICROSOFT__GRAPH_URL", &mock.graph_url())],
    )
    .await
    .expect("router starts");
    let admin = format!("http://{}", router.admin_addr.expect("an admin listener"));
    (mock, router, admin)
}

/// A client that shows redirects instead of following them.
fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

async fn api(method: &str, url: &str, body: Option<Value>) -> (u16, Value) {
    let client = http();
    let request = match method {
        "GET" => client.get(url),
        _ => client.post(url).json(&body.unwrap_or_else(|| json!({}))),
    };
    let response = request.bearer_auth(KEY).send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A consent URL's query, as Microsoft would read it.
fn consent_query(url: &str) -> HashMap<String, String> {
    let parsed = url::Url::parse(url).expect("an absolute URL");
    parsed.query_pairs().into_owned().collect()
}

async fn new_state(admin: &str, body: Value) -> (String, HashMap<String, String>) {
    let (status, made) = api(
        "POST",
        &format!("{admin}/api/v1/integration/teams/teams_prod/connection/url"),
        Some(body),
    )
    .await;
    assert_eq!(status, 200, "{made}");
    let url = made["url"].as_str().expect("url").to_owned();
    let query = consent_query(&url);
    (url, query)
}

/// Microsoft sends the admin's browser back to the router.
async fn callback(router: &TestRouter, query: &[(&str, &str)]) -> reqwest::Response {
    let query = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(query)
        .finish();
    browser()
        .get(format!("{}{CALLBACK}?{query}", router.base_url()))
        .send()
        .await
        .expect("callback")
}

async fn connections(admin: &str) -> Vec<Value> {
    let (status, list) = api(
        "GET",
        &format!("{admin}/api/v1/integration/teams/teams_prod/connection/list?order=asc"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{list}");
    list["items"].as_array().cloned().unwrap_or_default()
}

fn from_tenant(mut activity: Value, tenant: &str) -> Value {
    activity["conversation"]["tenantId"] = tenant.into();
    activity["channelData"]["tenant"]["id"] = tenant.into();
    activity
}

async fn deliver(mock: &MockMicrosoft, router: &TestRouter, activity: &Value) -> (u16, String) {
    post(
        &http(),
        &router.callback_url("teams_prod"),
        Some(&mock.token_for(APP_ID)),
        activity,
    )
    .await
}

#[tokio::test]
async fn an_admin_consent_round_trip_connects_a_tenant_once() {
    let (mock, router, admin) = start_router(300_000).await;
    let (url, query) = new_state(
        &admin,
        json!({"state": "caller-7", "redirectUrl": "https://app.example.com/connected?from=router"}),
    )
    .await;
    assert!(
        url.starts_with(&format!(
            "{}/organizations/v2.0/adminconsent?",
            mock.login_url()
        )),
        "{url}"
    );
    assert_eq!(query["client_id"], APP_ID);
    assert_eq!(query["scope"], GRAPH_SCOPE);
    assert_eq!(query["redirect_uri"], format!("{PUBLIC_URL}{CALLBACK}"));
    let state = query["state"].clone();

    // The admin of TENANT_B consents: Microsoft now issues the app tokens there.
    mock.consent(APP_ID, APP_SECRET, TENANT_B);
    let back = callback(
        &router,
        &[
            ("admin_consent", "True"),
            ("tenant", TENANT_B),
            ("scope", "https://graph.microsoft.com/User.Read.All"),
            ("state", &state),
        ],
    )
    .await;
    assert_eq!(back.status().as_u16(), 302);
    let location = url::Url::parse(
        back.headers()["location"]
            .to_str()
            .expect("a location header"),
    )
    .expect("an absolute location");
    assert_eq!(location.host_str(), Some("app.example.com"));
    let pairs: HashMap<String, String> = location.query_pairs().into_owned().collect();
    assert_eq!(pairs["tenant"], TENANT_B);
    assert_eq!(pairs["state"], "caller-7");
    assert_eq!(pairs["from"], "router");

    let listed = connections(&admin).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["tenantId"], TENANT_B);
    assert_eq!(listed[0]["source"], "consent");
    assert_eq!(listed[0]["graphConsent"], true);

    // The same state again: refused, whatever it carries.
    let reused = callback(
        &router,
        &[
            ("admin_consent", "True"),
            ("tenant", TENANT_C),
            ("state", &state),
        ],
    )
    .await;
    assert_eq!(reused.status().as_u16(), 400);
    assert!(
        reused
            .headers()
            .get("content-type")
            .is_some_and(|v| v.to_str().unwrap_or_default().starts_with("text/html"))
    );
    assert!(reused.text().await.unwrap().contains("already used"));

    // A state the router did not sign.
    let (_, fresh) = new_state(&admin, json!({})).await;
    let mut forged = fresh["state"].clone();
    forged.insert(0, 'x');
    let refused = callback(
        &router,
        &[
            ("admin_consent", "True"),
            ("tenant", TENANT_C),
            ("state", &forged),
        ],
    )
    .await;
    assert_eq!(refused.status().as_u16(), 400);
    assert!(
        refused
            .text()
            .await
            .unwrap()
            .contains("not started by this router")
    );

    // A refusal carries admin_consent=True too; the error decides.
    let declined = callback(
        &router,
        &[
            ("admin_consent", "True"),
            ("tenant", TENANT_C),
            ("error", "access_denied"),
            (
                "error_description",
                "AADSTS65004: User declined to consent.",
            ),
            ("state", &fresh["state"]),
        ],
    )
    .await;
    assert_eq!(declined.status().as_u16(), 400);
    assert!(declined.text().await.unwrap().contains("access_denied"));

    // A tenant that issues the app no token is not taken on the redirect's word.
    let (_, unissued) = new_state(&admin, json!({})).await;
    let not_consented = callback(
        &router,
        &[
            ("admin_consent", "True"),
            ("tenant", TENANT_C),
            ("state", &unissued["state"]),
        ],
    )
    .await;
    assert_eq!(not_consented.status().as_u16(), 400);
    assert_eq!(connections(&admin).await.len(), 1);

    let scrape = metrics(&router).await;
    for (outcome, count) in [
        ("connected", 1.0),
        ("reused_state", 1.0),
        ("invalid_state", 1.0),
        ("refused", 1.0),
        ("no_token", 1.0),
    ] {
        assert_eq!(
            metric_value(
                &scrape,
                &format!("teams_router_consent_callbacks_total{{outcome=\"{outcome}\"}}")
            ),
            Some(count),
            "{outcome}"
        );
    }
    let (_, events) = api(
        "GET",
        &format!("{admin}/api/v1/integration/teams/teams_prod/event/list"),
        None,
    )
    .await;
    let kinds: Vec<&str> = events["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["type"].as_str())
        .collect();
    for kind in [
        "tenant.connected",
        "tenant.consent_refused",
        "tenant.consent_failed",
    ] {
        assert!(kinds.contains(&kind), "{kind} in {kinds:?}");
    }
}

#[tokio::test]
async fn a_consent_url_expires() {
    let (mock, router, admin) = start_router(300).await;
    let (_, query) = new_state(&admin, json!({})).await;
    mock.consent(APP_ID, APP_SECRET, TENANT_B);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let late = callback(
        &router,
        &[
            ("admin_consent", "True"),
            ("tenant", TENANT_B),
            ("state", &query["state"]),
        ],
    )
    .await;
    assert_eq!(late.status().as_u16(), 400);
    assert!(late.text().await.unwrap().contains("expired"));
    assert!(connections(&admin).await.is_empty());
    // Without a redirect URL, a connected organization gets a page saying so.
    let (_, query) = new_state(&admin, json!({})).await;
    let done = callback(
        &router,
        &[
            ("admin_consent", "True"),
            ("tenant", TENANT_B),
            ("state", &query["state"]),
        ],
    )
    .await;
    assert_eq!(done.status().as_u16(), 200);
    assert!(done.text().await.unwrap().contains("is connected"));
}

#[tokio::test]
async fn under_the_connected_policy_only_connected_tenants_reach_the_bot() {
    let (mock, router, admin) = start_router(300_000).await;
    let (status, updated) = api(
        "POST",
        &format!("{admin}/api/v1/integration/teams/teams_prod/update"),
        Some(json!({"tenantPolicy": "connected"})),
    )
    .await;
    assert_eq!(status, 200, "{updated}");
    let (_, fetched) = api(
        "GET",
        &format!("{admin}/api/v1/integration/teams/teams_prod/fetch"),
        None,
    )
    .await;
    assert_eq!(fetched["tenantPolicy"], "connected", "{fetched}");

    let message = |id: &str, tenant: &str| {
        from_tenant(personal_message(&mock, "a:policy", id, "hello"), tenant)
    };
    let (status, body) = deliver(&mock, &router, &message("p-1", TENANT_B)).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("tenant_not_connected"), "{body}");

    // An admin of TENANT_B consents: its activities come in.
    let (_, query) = new_state(&admin, json!({})).await;
    mock.consent(APP_ID, APP_SECRET, TENANT_B);
    let back = callback(
        &router,
        &[
            ("admin_consent", "True"),
            ("tenant", TENANT_B),
            ("state", &query["state"]),
        ],
    )
    .await;
    assert_eq!(back.status().as_u16(), 200);
    let (status, body) = deliver(&mock, &router, &message("p-2", TENANT_B)).await;
    assert_eq!(status, 200, "{body}");

    // Installing the app connects TENANT_Z (the installation itself is let in).
    let (status, body) = deliver(&mock, &router, &message("p-3", TENANT_Z)).await;
    assert_eq!(status, 403, "{body}");
    let mut install = fixture("installationupdate-add-team.json");
    install["serviceUrl"] = mock.service_url().into();
    let install = from_tenant(install, TENANT_Z);
    let (status, body) = deliver(&mock, &router, &install).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = deliver(&mock, &router, &message("p-4", TENANT_Z)).await;
    assert_eq!(status, 200, "{body}");
    let listed = connections(&admin).await;
    let sources: HashMap<String, String> = listed
        .iter()
        .map(|c| {
            (
                c["tenantId"].as_str().unwrap_or_default().to_owned(),
                c["source"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(sources[TENANT_B], "consent");
    assert_eq!(sources[TENANT_Z], "installation");

    // Disconnected, it is refused again.
    let (status, body) = api(
        "POST",
        &format!("{admin}/api/v1/integration/teams/teams_prod/connection/{TENANT_Z}/delete"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = deliver(&mock, &router, &message("p-5", TENANT_Z)).await;
    assert_eq!(status, 403);
    let (status, _) = api(
        "POST",
        &format!("{admin}/api/v1/integration/teams/teams_prod/connection/{TENANT_Z}/delete"),
        None,
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(
        rejected(&metrics(&router).await, "tenant_not_connected"),
        3.0
    );
    // The answers went out for the two messages let in.
    mock.wait_for_activity_count(2, Duration::from_secs(10))
        .await;
}

async fn create_destination(admin: &str, body: Value) -> (u16, Value) {
    api(
        "POST",
        &format!("{admin}/api/v1/integration/teams/teams_prod/destination/create"),
        Some(body),
    )
    .await
}

async fn list_destinations(admin: &str, query: &str) -> Vec<Value> {
    let (status, list) = api(
        "GET",
        &format!("{admin}/api/v1/integration/teams/teams_prod/destination/list?order=asc&{query}"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{list}");
    list["items"].as_array().cloned().unwrap_or_default()
}

fn ids(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .filter_map(|d| d["id"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn destinations_of_every_type_are_kept_listed_and_kept_true() {
    let (mock, router, admin) = start_router(300_000).await;
    let team = "19:zFLSDFWsesfzcmKArqKJ-65aOXJz@sgf462H2wz41@thread.tacv2";
    let (status, channel) = create_destination(
        &admin,
        json!({"type": "channel", "teamId": team, "channelId": "19:general@thread.tacv2",
               "tenantId": TENANT_B, "subscriberId": "sub-1", "name": "Alerts",
               "meta": {"region": "emea", "tier": 2}}),
    )
    .await;
    assert_eq!(status, 200, "{channel}");
    let (_, user) = create_destination(
        &admin,
        json!({"type": "user", "aadObjectId": "eddfa9d4-346e-4cce-a18f-fa6261ad776b",
               "tenantId": TENANT_B, "subscriberId": "sub-1", "meta": {"region": "amer"}}),
    )
    .await;
    let (_, conversation) = create_destination(
        &admin,
        json!({"type": "conversation", "conversationId": "a:chat", "subscriberId": "sub-2"}),
    )
    .await;
    let secret_url = "https://prod-42.westus.logic.azure.com/workflows/abc/triggers/manual/paths/invoke?sig=SECRET-SIG";
    let (status, workflow) = create_destination(
        &admin,
        json!({"type": "workflow", "url": secret_url, "subscriberId": "sub-2"}),
    )
    .await;
    assert_eq!(status, 200, "{workflow}");

    // Refusals name the field.
    for (body, field) in [
        (json!({"type": "fax", "conversationId": "x"}), "type"),
        (json!({"type": "channel", "teamId": team}), "channelId"),
        (json!({"type": "user"}), "userId"),
        (
            json!({"type": "conversation", "conversationId": "a:x", "teamId": team}),
            "teamId",
        ),
        (
            json!({"type": "workflow", "url": "https://10.1.2.3/hook"}),
            "url",
        ),
        (json!({"type": "workflow", "url": "not a url"}), "url"),
    ] {
        let (status, refused) = create_destination(&admin, body.clone()).await;
        assert_eq!(status, 400, "{body}: {refused}");
        assert_eq!(refused["error"]["field"], field, "{body}: {refused}");
    }

    let all = list_destinations(&admin, "").await;
    assert_eq!(all.len(), 4);
    assert!(
        !serde_json::to_string(&all).unwrap().contains("SECRET-SIG"),
        "a Workflows URL is never shown"
    );
    assert_eq!(
        ids(&list_destinations(&admin, "subscriberId=sub-1").await),
        vec![
            channel["id"].as_str().unwrap(),
            user["id"].as_str().unwrap()
        ]
    );
    assert_eq!(
        ids(&list_destinations(&admin, "subscriberId=sub-2&type=conversation").await),
        vec![conversation["id"].as_str().unwrap()]
    );
    assert_eq!(
        ids(&list_destinations(&admin, "type=workflow").await),
        vec![workflow["id"].as_str().unwrap()]
    );
    assert_eq!(
        ids(&list_destinations(&admin, "meta%5Bregion%5D=emea&meta%5Btier%5D=2").await),
        vec![channel["id"].as_str().unwrap()]
    );
    let paged = api(
        "GET",
        &format!("{admin}/api/v1/integration/teams/teams_prod/destination/list?order=asc&take=3"),
        None,
    )
    .await
    .1;
    assert_eq!(paged["items"].as_array().map(Vec::len), Some(3));
    let rest = api(
        "GET",
        &format!(
            "{admin}/api/v1/integration/teams/teams_prod/destination/list?order=asc&take=3&cursor={}",
            paged["cursor"].as_str().expect("a cursor")
        ),
        None,
    )
    .await
    .1;
    assert_eq!(
        ids(rest["items"].as_array().unwrap()),
        vec![workflow["id"].as_str().unwrap()]
    );

    let channel_url = format!(
        "{admin}/api/v1/integration/teams/teams_prod/destination/{}",
        channel["id"].as_str().unwrap()
    );
    let (status, updated) = api(
        "POST",
        &format!("{channel_url}/update"),
        Some(json!({"name": "Incidents", "meta": {"tier": null}, "subscriberId": null})),
    )
    .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["name"], "Incidents");
    assert_eq!(updated["meta"], json!({"region": "emea"}));
    assert_eq!(updated["subscriberId"], Value::Null);
    let (status, _) = api(
        "POST",
        &format!("{channel_url}/update"),
        Some(json!({"type": "user"})),
    )
    .await;
    assert_eq!(status, 400);

    // The app uninstalled from the team: the channel there is not_installed; installed again,
    // it is active.
    let mut install = fixture("installationupdate-add-team.json");
    install["serviceUrl"] = mock.service_url().into();
    let mut remove = install.clone();
    remove["id"] = "f:remove-1".into();
    remove["action"] = "remove".into();
    let (status, _) = deliver(&mock, &router, &remove).await;
    assert_eq!(status, 200);
    let status_of = || async { api("GET", &format!("{channel_url}/fetch"), None).await.1 };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut fetched = status_of().await;
    while fetched["status"] != "not_installed" && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        fetched = status_of().await;
    }
    assert_eq!(fetched["status"], "not_installed", "{fetched}");
    assert!(
        fetched["statusReason"]
            .as_str()
            .unwrap_or_default()
            .contains("uninstalled")
    );
    let (status, _) = deliver(&mock, &router, &install).await;
    assert_eq!(status, 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while fetched["status"] != "active" && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        fetched = status_of().await;
    }
    assert_eq!(fetched["status"], "active", "{fetched}");
    // Installed, the team's channel takes proactive messages; uninstalled, they are refused
    // instead of sent.
    let post_to_channel = || async {
        api(
            "POST",
            &format!("{admin}/api/v1/integration/teams/teams_prod/message"),
            Some(json!({"channelId": "19:0b7f32667e064dd9b25d7969801541f4@thread.tacv2", "text": "to the channel"})),
        )
        .await
    };
    // The installation's turn teaches the router the channel's address.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut sent = post_to_channel().await;
    while sent.0 != 200 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        sent = post_to_channel().await;
    }
    assert_eq!(sent.0, 200, "{}", sent.1);
    remove["id"] = "f:remove-2".into();
    let (status, _) = deliver(&mock, &router, &remove).await;
    assert_eq!(status, 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut refused = post_to_channel().await;
    while refused.0 != 409 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        refused = post_to_channel().await;
    }
    assert_eq!(refused.0, 409, "{}", refused.1);
    assert_eq!(refused.1["error"]["code"], "not_installed");

    let (status, _) = api("POST", &format!("{channel_url}/delete"), None).await;
    assert_eq!(status, 200);
    let (status, _) = api("GET", &format!("{channel_url}/fetch"), None).await;
    assert_eq!(status, 404);
    assert_eq!(list_destinations(&admin, "").await.len(), 3);
}

/// Connects `tenant` by an admin's consent.
async fn consent(mock: &MockMicrosoft, router: &TestRouter, admin: &str, tenant: &str) {
    let (_, query) = new_state(admin, json!({})).await;
    mock.consent(APP_ID, APP_SECRET, tenant);
    let back = callback(
        router,
        &[
            ("admin_consent", "True"),
            ("tenant", tenant),
            ("state", &query["state"]),
        ],
    )
    .await;
    assert_eq!(back.status().as_u16(), 200);
}

async fn pages(first: &str) -> Vec<Value> {
    let mut all = Vec::new();
    let mut url = first.to_owned();
    let mut count = 0;
    loop {
        let (status, page) = api("GET", &url, None).await;
        assert_eq!(status, 200, "{url}: {page}");
        count += 1;
        all.push(page.clone());
        match page["cursor"].as_str() {
            Some(cursor) => {
                url = format!(
                    "{first}&cursor={}",
                    url::form_urlencoded::byte_serialize(cursor.as_bytes()).collect::<String>()
                )
            }
            None => break,
        }
        assert!(count < 20, "paging ends");
    }
    all
}

#[tokio::test]
async fn rosters_and_a_consenting_tenants_teams_and_channels_are_paged() {
    let (mock, router, admin) = start_router(300_000).await;
    // The roster of a conversation the router has seen, in pages of two.
    let (status, _) = deliver(
        &mock,
        &router,
        &from_tenant(personal_message(&mock, "a:roster", "r-1", "hi"), TENANT_B),
    )
    .await;
    assert_eq!(status, 200);
    mock.wait_for_activity_count(1, Duration::from_secs(10))
        .await;
    let members: Vec<Value> = (0..5)
        .map(|n| json!({"id": format!("29:member-{n}"), "name": format!("Member {n}"), "aadObjectId": format!("aad-{n}")}))
        .collect();
    mock.set_roster("a:roster", members.clone());
    let roster = pages(&format!(
        "{admin}/api/v1/integration/teams/teams_prod/members?conversationId=a%3Aroster&pageSize=2"
    ))
    .await;
    assert_eq!(roster.len(), 3, "{roster:?}");
    let listed: Vec<Value> = roster
        .iter()
        .flat_map(|p| p["items"].as_array().cloned().unwrap_or_default())
        .collect();
    assert_eq!(listed, members);
    let (status, unknown) = api(
        "GET",
        &format!("{admin}/api/v1/integration/teams/teams_prod/members?conversationId=a%3Anever"),
        None,
    )
    .await;
    assert_eq!(status, 404, "{unknown}");

    // Graph answers only for a tenant whose admin consented.
    let group = "da849743-4259-475f-ae7a-4f4b0fb49943";
    mock.set_graph_teams(
        TENANT_B,
        vec![
            json!({"id": group, "displayName": "TestTeam2022", "description": "d"}),
            json!({"id": "2b2b2b2b-0000-0000-0000-000000000002", "displayName": "Sales"}),
            json!({"id": "3c3c3c3c-0000-0000-0000-000000000003", "displayName": "Ops"}),
        ],
    );
    mock.set_graph_channels(
        group,
        vec![
            json!({"id": "19:general@thread.tacv2", "displayName": "General", "membershipType": "standard"}),
            json!({"id": "19:alerts@thread.tacv2", "displayName": "Alerts", "membershipType": "standard"}),
        ],
    );
    let teams_url =
        format!("{admin}/api/v1/integration/teams/teams_prod/graph/teams?tenantId={TENANT_B}");
    let (status, refused) = api("GET", &teams_url, None).await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["error"]["code"], "consent_required");
    consent(&mock, &router, &admin, TENANT_B).await;
    let teams = pages(&teams_url).await;
    assert_eq!(teams.len(), 2, "{teams:?}");
    let names: Vec<&str> = teams
        .iter()
        .flat_map(|p| p["items"].as_array().into_iter().flatten())
        .filter_map(|t| t["displayName"].as_str())
        .collect();
    assert_eq!(names, ["TestTeam2022", "Sales", "Ops"]);
    let channels = pages(&format!(
        "{admin}/api/v1/integration/teams/teams_prod/graph/teams/{group}/channels?tenantId={TENANT_B}"
    ))
    .await;
    assert_eq!(channels.len(), 1);
    assert_eq!(channels[0]["items"][1]["id"], "19:alerts@thread.tacv2");
    // A cursor that points anywhere else is refused before any token is sent.
    let before = mock.graph_requests();
    let evil = url::form_urlencoded::byte_serialize(
        base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            "https://evil.example.com/v1.0/teams?x=1",
        )
        .as_bytes(),
    )
    .collect::<String>();
    let (status, _) = api("GET", &format!("{teams_url}&cursor={evil}"), None).await;
    assert_eq!(status, 400);
    assert_eq!(mock.graph_requests(), before);

    // An installation gives no Graph consent.
    let mut install = fixture("installationupdate-add-team.json");
    install["serviceUrl"] = mock.service_url().into();
    let (status, _) = deliver(&mock, &router, &from_tenant(install, TENANT_Z)).await;
    assert_eq!(status, 200);
    let (status, refused) = api(
        "GET",
        &format!("{admin}/api/v1/integration/teams/teams_prod/graph/teams?tenantId={TENANT_Z}"),
        None,
    )
    .await;
    assert_eq!(status, 409, "{refused}");
}

const BROADCAST_TENANTS: [&str; 4] = [
    "b1b1b1b1-0000-4000-8000-000000000001",
    "b2b2b2b2-0000-4000-8000-000000000002",
    "b3b3b3b3-0000-4000-8000-000000000003",
    "b4b4b4b4-0000-4000-8000-000000000004",
];

/// A router with Teams' own limits, against a mock that enforces them.
async fn start_paced_router() -> (MockMicrosoft, TestRouter, String) {
    let mock = mock().await;
    mock.enforce_teams_limits(true);
    let config = config(
        &mock,
        &format!(
            "[[accounts]]\nid = \"ops\"\napi_key = \"{KEY}\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n"
        ),
    );
    let router = TestRouter::start_with_env(
        &config,
        &[
            ("TEAMS_ROUTER__CONNECTOR__APP_LIMITS", "[[1000, 50]]"),
            // Tenants the router has not seen are reached at the cloud's global endpoint.
            (
                "TEAMS_ROUTER__CONNECTOR__PROACTIVE_SERVICE_URL",
                &mock.service_url(),
            ),
            (
                "TEAMS_ROUTER__CONNECTOR__CONVERSATION_LIMITS",
                "[[1000, 7], [2000, 8], [30000, 60], [3600000, 1800]]",
            ),
        ],
    )
    .await
    .expect("router starts");
    let admin = format!("http://{}", router.admin_addr.expect("an admin listener"));
    (mock, router, admin)
}

fn user_message(mock: &MockMicrosoft, n: usize, id: &str) -> Value {
    let tenant = BROADCAST_TENANTS[n % 4];
    let mut message = from_tenant(
        personal_message(mock, &format!("a:chat-{n}"), id, "hello"),
        tenant,
    );
    message["from"]["id"] = format!("29:user-{n}").into();
    message
}

async fn broadcast_state(admin: &str, job: &str) -> Value {
    api(
        "GET",
        &format!("{admin}/api/v1/integration/teams/teams_prod/broadcast/{job}/fetch"),
        None,
    )
    .await
    .1
}

async fn wait_for_broadcast(admin: &str, job: &str, until: &[&str]) -> Value {
    // Long mode's jobs take minutes under Teams' limits (5,000 users in two tenants: 125 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(sized(60, 600) as u64);
    loop {
        let state = broadcast_state(admin, job).await;
        if until.contains(&state["status"].as_str().unwrap_or_default())
            || std::time::Instant::now() > deadline
        {
            return state;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn p99(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[(samples.len() * 99 / 100).min(samples.len() - 1)]
}

/// Live replies in one tenant: the time from each message to its answer.
async fn live_latencies(
    mock: &MockMicrosoft,
    router: &TestRouter,
    label: &str,
    count: usize,
) -> Vec<Duration> {
    let mut latencies = Vec::new();
    for n in 0..count {
        let id = format!("{label}-{n}");
        let mut message = from_tenant(
            personal_message(mock, &format!("a:live-{label}-{}", n % 10), &id, "ping"),
            BROADCAST_TENANTS[0],
        );
        message["from"]["id"] = format!("29:live-{}", n % 10).into();
        // Only what came after it is looked through: copying every recorded activity at each
        // look (thousands once a broadcast ran) would be measured as the router's latency.
        let mark = mock.activity_count();
        let sent = std::time::Instant::now();
        let (status, _) = deliver(mock, router, &message).await;
        assert_eq!(status, 200);
        loop {
            if mock
                .activities_from(mark)
                .iter()
                .any(|r| r.reply_to_id.as_deref() == Some(id.as_str()))
            {
                latencies.push(sent.elapsed());
                break;
            }
            assert!(sent.elapsed() < Duration::from_secs(30), "{id} answered");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    latencies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_reaches_every_recipient_once_within_teams_limits() {
    let (mock, router, admin) = start_paced_router().await;
    let users = sized(200, 2_000);
    // Half the users have talked to the bot (their chat is known); the others need one created.
    for n in (0..users).step_by(2) {
        let (status, _) = deliver(
            &mock,
            &router,
            &user_message(&mock, n, &format!("hello-{n}")),
        )
        .await;
        assert_eq!(status, 200);
    }
    mock.wait_for_activity_count(users / 2, Duration::from_secs(60))
        .await;
    let blocked: Vec<usize> = (1..users).step_by(2).take(5).collect();
    for n in &blocked {
        mock.block_user(&format!("29:user-{n}"));
    }
    let baseline = live_latencies(&mock, &router, "before", 30).await;
    let answers_before = mock.activity_count();
    mock.throttle_tenant(BROADCAST_TENANTS[3], Duration::from_millis(1_500));

    let recipients: Vec<Value> = (0..users)
        .map(|n| json!({"userId": format!("29:user-{n}"), "tenantId": BROADCAST_TENANTS[n % 4]}))
        .collect();
    let started = std::time::Instant::now();
    let (status, created) = api(
        "POST",
        &format!("{admin}/api/v1/integration/teams/teams_prod/broadcast/create"),
        Some(json!({
            "message": {"text": "Maintenance tonight at 22:00", "summary": "Maintenance", "alert": true},
            "recipients": {"users": recipients},
            "idempotencyKey": "maintenance-1",
        })),
    )
    .await;
    assert_eq!(status, 200, "{created}");
    let job = created["id"].as_str().expect("a job id").to_owned();
    assert_eq!(created["recipients"], users);
    // The same key gives the same job.
    let (_, again) = api(
        "POST",
        &format!("{admin}/api/v1/integration/teams/teams_prod/broadcast/create"),
        Some(json!({"message": {"text": "x"}, "recipients": {"users": ["29:other"]}, "idempotencyKey": "maintenance-1"})),
    )
    .await;
    assert_eq!(again["id"], job.as_str());

    let during = live_latencies(&mock, &router, "during", 30).await;
    let done = wait_for_broadcast(&admin, &job, &["done"]).await;
    let took = started.elapsed();
    assert_eq!(done["status"], "done", "{done}");
    assert_eq!(done["counts"]["sent"], users - blocked.len(), "{done}");
    assert_eq!(done["counts"]["failed"], blocked.len(), "{done}");
    assert_eq!(done["failures"]["blocked"], blocked.len(), "{done}");
    assert_eq!(
        mock.throttled(),
        0,
        "no 429 caused by the router's own pacing"
    );
    assert!(
        mock.scripted_throttles() > 0,
        "the throttled tenant was met"
    );

    // Each recipient got exactly one copy, with its tenant and the alert.
    let copies: Vec<_> = mock
        .activities_from(answers_before)
        .into_iter()
        .filter(|r| r.text() == "Maintenance tonight at 22:00")
        .collect();
    assert_eq!(copies.len(), users - blocked.len());
    let mut per_conversation: HashMap<String, usize> = HashMap::new();
    for copy in &copies {
        *per_conversation
            .entry(copy.conversation_id.clone())
            .or_default() += 1;
        assert!(
            copy.body.pointer("/channelData/tenant/id").is_some(),
            "{:?}",
            copy.body
        );
        assert_eq!(
            copy.body.pointer("/channelData/notification/alert"),
            Some(&json!(true))
        );
    }
    assert!(
        per_conversation.values().all(|&n| n == 1),
        "one copy per chat"
    );
    let created_chats = mock.created_conversations().len();
    assert!(
        created_chats >= users / 2 - blocked.len(),
        "{created_chats} chats created"
    );

    let failed = api(
        "GET",
        &format!("{admin}/api/v1/integration/teams/teams_prod/broadcast/{job}/recipient/list?status=failed&take=100"),
        None,
    )
    .await
    .1;
    let failed_users: Vec<&str> = failed["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["to"]["userId"].as_str())
        .collect();
    assert_eq!(failed_users.len(), blocked.len(), "{failed}");
    assert!(
        failed["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["reason"] == "blocked")
    );

    // Two unblock the bot: a retry sends to the failed ones only.
    mock.unblock_user(&format!("29:user-{}", blocked[0]));
    mock.unblock_user(&format!("29:user-{}", blocked[1]));
    let before_retry = mock.activity_count();
    let (status, retried) = api(
        "POST",
        &format!("{admin}/api/v1/integration/teams/teams_prod/broadcast/{job}/retry"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{retried}");
    let done = wait_for_broadcast(&admin, &job, &["done"]).await;
    assert_eq!(done["counts"]["sent"], users - blocked.len() + 2, "{done}");
    assert_eq!(done["failures"]["blocked"], blocked.len() - 2);
    assert_eq!(
        mock.activity_count() - before_retry,
        2,
        "the sent ones are untouched"
    );

    // Every delivered copy is updated, then recalled.
    let delivered = users - blocked.len() + 2;
    let before_edits = mock.activity_count();
    let (status, updated) = api(
        "POST",
        &format!("{admin}/api/v1/integration/teams/teams_prod/broadcast/{job}/update"),
        Some(json!({"message": {"text": "Maintenance moved to 23:00"}})),
    )
    .await;
    assert_eq!(status, 200, "{updated}");
    let done = wait_for_broadcast(&admin, &job, &["done"]).await;
    assert_eq!(done["status"], "done", "{done}");
    let puts: Vec<_> = mock
        .activities_from(before_edits)
        .into_iter()
        .filter(|r| r.method == "PUT")
        .collect();
    assert_eq!(puts.len(), delivered);
    assert!(
        puts.iter()
            .all(|r| r.text() == "Maintenance moved to 23:00")
    );
    let before_recall = mock.activity_count();
    let (status, _) = api(
        "POST",
        &format!("{admin}/api/v1/integration/teams/teams_prod/broadcast/{job}/recall"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let done = wait_for_broadcast(&admin, &job, &["done"]).await;
    assert_eq!(done["status"], "done", "{done}");
    let deletes = mock
        .activities_from(before_recall)
        .into_iter()
        .filter(|r| r.method == "DELETE")
        .count();
    assert_eq!(deletes, delivered);
    assert_eq!(mock.throttled(), 0, "edits are paced too");

    let (baseline_p99, during_p99) = (p99(baseline), p99(during));
    eprintln!(
        "broadcast to {users} users in 4 tenants: {took:?}, {created_chats} chats created, {} blocked, live e2e p99 {baseline_p99:?} before, {during_p99:?} during",
        blocked.len()
    );
    assert!(
        during_p99 <= baseline_p99 * 2 + Duration::from_millis(100),
        "live replies during the broadcast: p99 {during_p99:?} against {baseline_p99:?} without it"
    );
    let scrape = metrics(&router).await;
    assert!(
        metric_value(
            &scrape,
            "teams_router_broadcast_recipients_total{outcome=\"sent\"}"
        )
        .unwrap_or(0.0)
            >= (users - blocked.len()) as f64
    );
}

/// The binary with the embedded store in `dir`, Teams' limits, unseen tenants reached at the
/// mock.
async fn spawn_paced(
    mock: &MockMicrosoft,
    dir: &std::path::Path,
) -> loadtest::router::RouterProcess {
    loadtest::router::RouterProcess::spawn_with_env(
        &binary(),
        &config_with_storage(
            mock,
            &format!("[storage]\npath = {dir:?}\n"),
            &format!("[[accounts]]\nid = \"ops\"\napi_key = \"{KEY}\"\n"),
        ),
        &[
            ("TEAMS_ROUTER__CONNECTOR__APP_LIMITS", "[[1000, 50]]"),
            (
                "TEAMS_ROUTER__CONNECTOR__CONVERSATION_LIMITS",
                "[[1000, 7], [2000, 8], [30000, 60], [3600000, 1800]]",
            ),
            (
                "TEAMS_ROUTER__CONNECTOR__PROACTIVE_SERVICE_URL",
                &mock.service_url(),
            ),
        ],
    )
    .await
    .expect("router starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_killed_mid_broadcast_finishes_it_after_a_restart() {
    let mock = mock().await;
    mock.enforce_teams_limits(true);
    let dir = scratch_dir("broadcast-kill");
    let mut router = spawn_paced(&mock, &dir).await;
    let users = sized(300, 5_000);
    let recipients: Vec<Value> = (0..users)
        .map(|n| json!({"userId": format!("29:kill-{n}"), "tenantId": BROADCAST_TENANTS[n % 2]}))
        .collect();
    let mut job = String::new();
    for page in recipients.chunks(10_000).enumerate() {
        let (n, page) = page;
        let url = if n == 0 {
            format!(
                "{}/api/v1/integration/teams/teams_prod/broadcast/create",
                router.base_url()
            )
        } else {
            format!(
                "{}/api/v1/integration/teams/teams_prod/broadcast/{job}/recipients",
                router.base_url()
            )
        };
        let body = if n == 0 {
            json!({"message": {"text": "Kill test"}, "recipients": {"users": page}, "start": false})
        } else {
            json!({"recipients": {"users": page}})
        };
        let (status, answer) = api("POST", &url, Some(body)).await;
        assert_eq!(status, 200, "{answer}");
        if n == 0 {
            job = answer["id"].as_str().expect("job").to_owned();
        }
    }
    let base = router.base_url();
    // The same users again add nobody; the recipients page through in their order.
    let (status, again) = api(
        "POST",
        &format!("{base}/api/v1/integration/teams/teams_prod/broadcast/{job}/recipients"),
        Some(json!({"recipients": {"users": recipients[..10].to_vec()}})),
    )
    .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(
        (again["added"].as_u64(), again["recipients"].as_u64()),
        (Some(0), Some(users as u64))
    );
    let list = format!(
        "{base}/api/v1/integration/teams/teams_prod/broadcast/{job}/recipient/list?take=100&status=pending"
    );
    let (mut numbers, mut url) = (Vec::new(), list.clone());
    loop {
        let (status, page) = api("GET", &url, None).await;
        assert_eq!(status, 200, "{page}");
        numbers.extend(
            page["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r["index"].as_u64()),
        );
        match page["cursor"].as_str() {
            Some(cursor) => url = format!("{list}&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(numbers, (0..users as u64).collect::<Vec<_>>());
    let (status, _) = api(
        "POST",
        &format!("{base}/api/v1/integration/teams/teams_prod/broadcast/{job}/start"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while mock.activity_count() < users / 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    router.kill().await;
    let sent_before = mock.activity_count();
    let killed_at = std::time::Instant::now();
    let router = spawn_paced(&mock, &dir).await;
    let done = wait_for_broadcast(&router.base_url(), &job, &["done"]).await;
    assert_eq!(done["status"], "done", "{done}");
    assert_eq!(done["counts"]["sent"], users, "{done}");
    let copies = mock
        .activities()
        .into_iter()
        .filter(|r| r.text() == "Kill test")
        .count();
    let duplicates = copies - users;
    let in_flight = done["resumedInFlight"].as_u64().unwrap_or(0) as usize;
    eprintln!(
        "broadcast to {users} users, killed after {sent_before} sends: finished {:?} after the restart, {duplicates} duplicate(s), {in_flight} in flight at the kill",
        killed_at.elapsed()
    );
    assert!(
        duplicates <= in_flight,
        "{duplicates} duplicates, {in_flight} in flight"
    );
    assert_eq!(mock.throttled(), 0);
    // The job's state changes are in the integration's event log, the runner's own included.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let (_, events) = api(
        "GET",
        &format!(
            "{}/api/v1/integration/teams/teams_prod/event/list?take=100",
            router.base_url()
        ),
        None,
    )
    .await;
    let messages: Vec<&str> = events["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| {
            e["type"]
                .as_str()
                .is_some_and(|t| t.starts_with("broadcast."))
        })
        .filter_map(|e| e["message"].as_str())
        .collect();
    assert!(
        messages.iter().any(|m| *m == format!("{job} done")),
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with(&format!("{job} resumed"))),
        "{messages:?}"
    );
}

#[tokio::test]
async fn a_proactive_message_is_updated_and_deleted_later_and_only_the_routers_own() {
    let (mock, router, admin) = start_router(300_000).await;
    let (status, _) = deliver(
        &mock,
        &router,
        &from_tenant(personal_message(&mock, "a:edit", "e-1", "hi"), TENANT_B),
    )
    .await;
    assert_eq!(status, 200);
    mock.wait_for_activity_count(1, Duration::from_secs(10))
        .await;
    let (status, sent) = api(
        "POST",
        &format!("{admin}/api/v1/integration/teams/teams_prod/message"),
        Some(json!({"conversationId": "a:edit", "text": "v1"})),
    )
    .await;
    assert_eq!(status, 200, "{sent}");
    let activity = sent["activityId"]
        .as_str()
        .expect("an activity id")
        .to_owned();
    let edit =
        |text: &str| json!({"conversationId": "a:edit", "activityId": activity, "text": text});
    let (status, body) = api(
        "POST",
        &format!("{admin}/api/v1/integration/teams/teams_prod/message/update"),
        Some(edit("v2")),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let put = mock
        .activities()
        .into_iter()
        .find(|r| r.method == "PUT")
        .expect("a PUT");
    assert_eq!(put.text(), "v2");
    assert_eq!(put.reply_to_id.as_deref(), Some(activity.as_str()));
    // An activity the router did not send through here.
    let (status, _) = api(
        "POST",
        &format!("{admin}/api/v1/integration/teams/teams_prod/message/update"),
        Some(json!({"conversationId": "a:edit", "activityId": "1999", "text": "x"})),
    )
    .await;
    assert_eq!(status, 404);
    let (status, body) = api(
        "POST",
        &format!("{admin}/api/v1/integration/teams/teams_prod/message/delete"),
        Some(json!({"conversationId": "a:edit", "activityId": activity})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(mock.activities().iter().any(|r| r.method == "DELETE"));
    let (status, _) = api(
        "POST",
        &format!("{admin}/api/v1/integration/teams/teams_prod/message/update"),
        Some(edit("v3")),
    )
    .await;
    assert_eq!(
        status, 404,
        "a deleted message is no longer the router's to change"
    );

    // Teams lost the user's chat: the router creates it once more and sends there.
    mock.lose_conversation("a:edit");
    let user = personal_message(&mock, "a:edit", "x", "x")["from"]["id"]
        .as_str()
        .expect("the fixture's user")
        .to_owned();
    let (status, resent) = api(
        "POST",
        &format!("{admin}/api/v1/integration/teams/teams_prod/message"),
        Some(json!({"userId": user, "text": "again"})),
    )
    .await;
    assert_eq!(status, 200, "{resent}");
    assert_ne!(resent["conversationId"], "a:edit");
    assert_eq!(mock.created_conversations().len(), 1);
}

#[tokio::test]
async fn a_broadcast_posts_an_adaptive_card_to_workflow_destinations() {
    let (mock, router, admin) = start_router(300_000).await;
    let (status, _) = deliver(
        &mock,
        &router,
        &from_tenant(personal_message(&mock, "a:wf-chat", "wf-1", "hi"), TENANT_B),
    )
    .await;
    assert_eq!(status, 200);
    mock.wait_for_activity_count(1, Duration::from_secs(10))
        .await;
    let (status, workflow) = create_destination(
        &admin,
        json!({"type": "workflow", "url": mock.workflow_url("ops-alerts"), "meta": {"team": "ops"}}),
    )
    .await;
    assert_eq!(status, 200, "{workflow}");
    let (status, _) = create_destination(
        &admin,
        json!({"type": "conversation", "conversationId": "a:wf-chat", "meta": {"team": "ops"}}),
    )
    .await;
    assert_eq!(status, 200);
    let (status, created) = api(
        "POST",
        &format!("{admin}/api/v1/integration/teams/teams_prod/broadcast/create"),
        Some(json!({"message": {"text": "Disk almost full"}, "recipients": {"allDestinations": {"meta": {"team": "ops"}}}})),
    )
    .await;
    assert_eq!(status, 200, "{created}");
    assert_eq!(created["recipients"], 2);
    let done = wait_for_broadcast(&admin, created["id"].as_str().unwrap(), &["done"]).await;
    assert_eq!(done["counts"]["sent"], 2, "{done}");
    let posts = mock.workflow_posts();
    assert_eq!(posts.len(), 1);
    assert!(posts[0].0.starts_with("/workflows/ops-alerts?sig="));
    assert_eq!(
        posts[0].1["attachments"][0]["contentType"],
        "application/vnd.microsoft.card.adaptive"
    );
    assert_eq!(
        posts[0].1["attachments"][0]["content"]["body"][0]["text"],
        "Disk almost full"
    );
    assert!(
        mock.activities()
            .iter()
            .any(|r| r.conversation_id == "a:wf-chat" && r.text() == "Disk almost full")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_router_takes_over_a_broadcast_when_its_runner_dies() {
    let redis = loadtest::redis::RedisServer::start().expect("redis-server");
    let mock = mock().await;
    mock.enforce_teams_limits(true);
    let spawn = |name: &'static str| {
        let mock = mock.clone();
        let url = redis.url();
        async move {
            loadtest::router::RouterProcess::spawn_with_env(
                &binary(),
                &config_with_storage(
                    &mock,
                    &format!(
                        "[storage]\nbackend = \"redis\"\nredis_url = \"{url}\"\ninstance_id = \"{name}\"\npath = {:?}\n",
                        scratch_dir(name)
                    ),
                    &format!("[[accounts]]\nid = \"ops\"\napi_key = \"{KEY}\"\n\n[admin]\nsync_interval_ms = 200\n"),
                ),
                &[
                    ("TEAMS_ROUTER__CONNECTOR__APP_LIMITS", "[[1000, 50]]"),
                    (
                        "TEAMS_ROUTER__CONNECTOR__CONVERSATION_LIMITS",
                        "[[1000, 7], [2000, 8], [30000, 60], [3600000, 1800]]",
                    ),
                    ("TEAMS_ROUTER__CONNECTOR__PROACTIVE_SERVICE_URL", &mock.service_url()),
                    // Both routers seal with one master key, as routers sharing a store must.
                    ("TEAMS_ROUTER__SECURITY__MASTER_KEY_ENV", "NOTIFY_TEST_MASTER_KEY"),
                    ("NOTIFY_TEST_MASTER_KEY", MASTER_KEY_HEX),
                ],
            )
            .await
            .expect("router starts")
        }
    };
    let mut first = spawn("bc-a").await;
    let second = spawn("bc-b").await;
    let users = sized(300, 5_000);
    let recipients: Vec<Value> = (0..users)
        .map(
            |n| json!({"userId": format!("29:takeover-{n}"), "tenantId": BROADCAST_TENANTS[n % 2]}),
        )
        .collect();
    let (status, created) = api(
        "POST",
        &format!(
            "{}/api/v1/integration/teams/teams_prod/broadcast/create",
            first.base_url()
        ),
        Some(json!({"message": {"text": "Takeover"}, "recipients": {"users": recipients}})),
    )
    .await;
    assert_eq!(status, 200, "{created}");
    let job = created["id"].as_str().expect("job").to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while mock.activity_count() < users / 3 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.kill().await;
    let killed_at = std::time::Instant::now();
    let done = wait_for_broadcast(&second.base_url(), &job, &["done"]).await;
    assert_eq!(done["status"], "done", "{done}");
    assert_eq!(done["counts"]["sent"], users, "{done}");
    let copies = mock
        .activities()
        .into_iter()
        .filter(|r| r.text() == "Takeover")
        .count();
    let in_flight = done["resumedInFlight"].as_u64().unwrap_or(0) as usize;
    eprintln!(
        "broadcast to {users} users: its router killed at a third, the other finished it {:?} later; {} duplicate(s), {in_flight} in flight at the kill",
        killed_at.elapsed(),
        copies - users
    );
    assert!(copies - users <= in_flight);
    assert_eq!(mock.throttled(), 0);
}
