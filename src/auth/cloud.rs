//! Microsoft's clouds (protocol.md §1.2): where an integration's signing keys, token issuer and
//! outbound tokens come from. An integration names its cloud (`cloud = "usgov-gcch"`), or gives
//! the values itself; without either it uses the `[microsoft]` section (what tests point at their
//! mock). One process serves several clouds, each with its own keys and token cache.

use std::sync::Arc;

/// The values of one cloud an integration is served with.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CloudAuth {
    pub openid_metadata_url: String,
    pub token_issuer: String,
    /// The authority host of outbound tokens: `{login_url}/{tenant}/oauth2/v2.0/token`.
    pub login_url: String,
    /// The token tenant of a multi-tenant bot (a single-tenant bot asks its own).
    pub token_tenant: String,
    pub oauth_scope: String,
    /// Microsoft Graph's app-only scope and base URL in this cloud.
    pub graph_scope: String,
    pub graph_url: String,
}

/// The clouds of protocol.md §1.2, by the name an integration gives.
pub const CLOUD_NAMES: &[&str] = &["public", "gcc", "usgov-gcch", "usgov-dod", "china"];

impl CloudAuth {
    /// The values of a named cloud. GCC authenticates as the public cloud (only its Connector
    /// host differs, and replies go to the serviceUrl Teams gives); DoD as GCC High.
    pub fn named(name: &str) -> Option<Self> {
        let public = || Self {
            openid_metadata_url:
                "https://login.botframework.com/v1/.well-known/openidconfiguration".into(),
            token_issuer: "https://api.botframework.com".into(),
            login_url: "https://login.microsoftonline.com".into(),
            token_tenant: "botframework.com".into(),
            oauth_scope: "https://api.botframework.com/.default".into(),
            graph_scope: "https://graph.microsoft.com/.default".into(),
            graph_url: "https://graph.microsoft.com".into(),
        };
        let government = || Self {
            openid_metadata_url:
                "https://login.botframework.azure.us/v1/.well-known/openidconfiguration".into(),
            token_issuer: "https://api.botframework.us".into(),
            login_url: "https://login.microsoftonline.us".into(),
            token_tenant: "MicrosoftServices.onmicrosoft.us".into(),
            oauth_scope: "https://api.botframework.us/.default".into(),
            graph_scope: "https://graph.microsoft.us/.default".into(),
            graph_url: "https://graph.microsoft.us".into(),
        };
        match name {
            "public" | "gcc" => Some(public()),
            "usgov-gcch" => Some(government()),
            "usgov-dod" => Some(Self {
                graph_scope: "https://dod-graph.microsoft.us/.default".into(),
                graph_url: "https://dod-graph.microsoft.us".into(),
                ..government()
            }),
            "china" => Some(Self {
                openid_metadata_url:
                    "https://login.botframework.azure.cn/v1/.well-known/openidconfiguration".into(),
                token_issuer: "https://api.botframework.azure.cn".into(),
                login_url: "https://login.partner.microsoftonline.cn".into(),
                token_tenant: "microsoftservices.partner.onmschina.cn".into(),
                oauth_scope: "https://api.botframework.azure.cn/.default".into(),
                graph_scope: "https://microsoftgraph.chinacloudapi.cn/.default".into(),
                graph_url: "https://microsoftgraph.chinacloudapi.cn".into(),
            }),
            _ => None,
        }
    }
}

pub use crate::records::CloudOverrides;

/// The cloud of an integration: `None` for the `[microsoft]` section's values.
pub fn resolve(
    cloud: Option<&str>,
    overrides: Option<&CloudOverrides>,
) -> Result<Option<Arc<CloudAuth>>, String> {
    let overrides = overrides.filter(|o| !o.is_empty());
    let base = match cloud {
        None if overrides.is_none() => return Ok(None),
        None => CloudAuth::named("public"),
        Some(name) => CloudAuth::named(name),
    };
    let Some(mut auth) = base else {
        return Err(format!(
            "cloud {:?} is not one of {}",
            cloud.unwrap_or_default(),
            CLOUD_NAMES.join(", ")
        ));
    };
    if let Some(o) = overrides {
        let set = |field: &mut String, value: &Option<String>| {
            if let Some(value) = value {
                *field = value.clone();
            }
        };
        set(&mut auth.openid_metadata_url, &o.openid_metadata_url);
        set(&mut auth.token_issuer, &o.token_issuer);
        set(&mut auth.login_url, &o.login_url);
        set(&mut auth.token_tenant, &o.token_tenant);
        set(&mut auth.oauth_scope, &o.oauth_scope);
        for (field, value) in [
            ("openidMetadataUrl", &auth.openid_metadata_url),
            ("loginUrl", &auth.login_url),
        ] {
            match url::Url::parse(value) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                _ => {
                    return Err(format!(
                        "cloudSettings.{field}: {value:?} is not an http(s) URL"
                    ));
                }
            }
        }
    }
    Ok(Some(Arc::new(auth)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_clouds_have_the_values_of_the_cloud_table() {
        let high = CloudAuth::named("usgov-gcch").unwrap();
        assert_eq!(high.token_issuer, "https://api.botframework.us");
        assert_eq!(high.token_tenant, "MicrosoftServices.onmicrosoft.us");
        // DoD authenticates as GCC High; only its Graph differs.
        let dod = CloudAuth::named("usgov-dod").unwrap();
        assert_eq!(dod.graph_url, "https://dod-graph.microsoft.us");
        assert_eq!(
            CloudAuth {
                graph_scope: high.graph_scope.clone(),
                graph_url: high.graph_url.clone(),
                ..dod
            },
            high
        );
        assert_eq!(CloudAuth::named("gcc"), CloudAuth::named("public"));
        assert_eq!(
            CloudAuth::named("china").unwrap().login_url,
            "https://login.partner.microsoftonline.cn"
        );
        assert!(resolve(Some("mars"), None).is_err());
        assert_eq!(resolve(None, None).unwrap(), None);
    }

    #[test]
    fn overrides_replace_single_values() {
        let overrides = CloudOverrides {
            login_url: Some("http://127.0.0.1:9/login".into()),
            ..CloudOverrides::default()
        };
        let auth = resolve(Some("usgov-gcch"), Some(&overrides))
            .unwrap()
            .unwrap();
        assert_eq!(auth.login_url, "http://127.0.0.1:9/login");
        assert_eq!(auth.token_issuer, "https://api.botframework.us");
    }
}
