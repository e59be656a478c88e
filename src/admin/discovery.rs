//! Finding where notifications can go: a conversation's roster through the Bot Connector
//! (`…/members?conversationId=`), and a connected tenant's teams and channels through Microsoft
//! Graph (`…/graph/teams?tenantId=`, `…/graph/teams/{teamId}/channels?tenantId=`), each one
//! page at a time with the `cursor` of the next.

use hyper::StatusCode;
use serde_json::{Value, json};

use super::model::Invalid;
use super::{Admin, ApiError, ApiResult};
use crate::connector::{ConnectorError, Route};
use crate::notify::graph::{GraphCloud, GraphError, Listing};
use crate::registry::Integration;

/// The largest roster page Teams serves.
const MAX_PAGE_SIZE: u32 = 500;

fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
        .filter(|value| !value.is_empty())
}

fn required_query(query: Option<&str>, name: &'static str) -> Result<String, ApiError> {
    query_value(query, name)
        .filter(|v| v.len() <= 512)
        .ok_or_else(|| Invalid::field(name, format!("{name} is required")).into())
}

impl Admin {
    /// `GET …/members?conversationId=&pageSize=&cursor=`: one page of the roster of a
    /// conversation (a team, a group chat) the router has had traffic from.
    pub(super) async fn list_members(
        &self,
        account: &str,
        id: &str,
        query: Option<&str>,
    ) -> ApiResult {
        let integration = self.owned_integration(account, id)?;
        let conversation = required_query(query, "conversationId")?;
        let page_size = match query_value(query, "pageSize") {
            None => None,
            Some(size) => Some(
                size.parse::<u32>()
                    .ok()
                    .filter(|s| (1..=MAX_PAGE_SIZE).contains(s))
                    .ok_or_else(|| {
                        Invalid::field("pageSize", format!("pageSize: 1 to {MAX_PAGE_SIZE}"))
                    })?,
            ),
        };
        let cursor = query_value(query, "cursor");
        let address = self
            .parts
            .addresses
            .find(&integration.record.id, &format!("conv:{conversation}"))
            .await
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "conversation_unknown",
                    "the router has had no traffic from this conversation (it needs its serviceUrl)",
                )
            })?;
        let route = Route {
            credentials: integration.credentials.as_deref(),
            tenant: address.tenant_id.as_deref(),
            service_url: &address.service_url,
            conversation_id: &conversation,
            budget_percent: 100,
        };
        let page = self
            .parts
            .connector
            .paged_members(route, page_size, cursor.as_deref())
            .await
            .map_err(|error| connector_failure(&error))?;
        Ok(json!({
            "items": page.get("members").cloned().unwrap_or_else(|| json!([])),
            "cursor": page.get("continuationToken").and_then(Value::as_str),
        }))
    }

    /// `GET …/graph/teams?tenantId=&cursor=`
    pub(super) async fn list_graph_teams(
        &self,
        account: &str,
        id: &str,
        query: Option<&str>,
    ) -> ApiResult {
        self.graph_page(account, id, query, Listing::Teams).await
    }

    /// `GET …/graph/teams/{teamId}/channels?tenantId=&cursor=`
    pub(super) async fn list_graph_channels(
        &self,
        account: &str,
        id: &str,
        team_id: &str,
        query: Option<&str>,
    ) -> ApiResult {
        self.graph_page(account, id, query, Listing::Channels { team_id })
            .await
    }

    async fn graph_page(
        &self,
        account: &str,
        id: &str,
        query: Option<&str>,
        listing: Listing<'_>,
    ) -> ApiResult {
        let integration = self.owned_integration(account, id)?;
        let tenant = required_query(query, "tenantId")?;
        let consented = self
            .parts
            .tenants
            .get(&integration.record.id, &tenant)
            .is_some_and(|c| c.has_graph_consent());
        if !consented {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "consent_required",
                "Microsoft Graph answers only for tenants whose administrator consented to the app (connection/url); an installation gives no Graph consent",
            ));
        }
        let Some(credentials) = integration.credentials.as_deref() else {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "missing_credentials",
                "the integration has no app credentials",
            ));
        };
        let page = self
            .parts
            .graph
            .page(
                credentials,
                &tenant,
                self.graph_cloud(&integration),
                listing,
                query_value(query, "cursor").as_deref(),
            )
            .await
            .map_err(|error| match error {
                GraphError::BadCursor => ApiError::from(Invalid::field(
                    "cursor",
                    "cursor: not one this listing gave",
                )),
                GraphError::Refused { status: 404, .. } => ApiError::not_found("team"),
                other => ApiError::new(StatusCode::BAD_GATEWAY, "graph_failed", other.to_string()),
            })?;
        let items: Vec<Value> = page
            .items
            .iter()
            .map(|item| {
                json!({
                    "id": item.get("id"),
                    "displayName": item.get("displayName"),
                    "description": item.get("description"),
                    "membershipType": item.get("membershipType"),
                })
            })
            .map(|mut view| {
                if let Some(fields) = view.as_object_mut() {
                    fields.retain(|_, value| !value.is_null());
                }
                view
            })
            .collect();
        Ok(json!({"items": items, "cursor": page.cursor}))
    }

    fn graph_cloud<'a>(&'a self, integration: &'a Integration) -> GraphCloud<'a> {
        match &integration.cloud {
            Some(cloud) => GraphCloud {
                base_url: &cloud.graph_url,
                scope: &cloud.graph_scope,
            },
            None => GraphCloud {
                base_url: &self.microsoft.graph_url,
                scope: &self.microsoft.graph_scope,
            },
        }
    }
}

fn connector_failure(error: &ConnectorError) -> ApiError {
    match error.status() {
        Some(404) => ApiError::new(
            StatusCode::NOT_FOUND,
            "conversation_not_found",
            format!("Teams does not know the conversation: {error}"),
        ),
        Some(403) => ApiError::new(
            StatusCode::CONFLICT,
            "not_installed",
            format!("Teams refused: {error}"),
        ),
        _ => match error {
            ConnectorError::QueueFull(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "connector_busy",
                error.to_string(),
            ),
            _ => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "connector_failed",
                error.to_string(),
            ),
        },
    }
}
