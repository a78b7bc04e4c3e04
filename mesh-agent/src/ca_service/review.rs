//! Authenticating callers: the API server reviews each bearer token
//! (`authentication.k8s.io/v1` TokenReview) for the audience the CA serves, and
//! says whose it is and which pod it is bound to.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};

use super::authorize::{BoundPod, Caller, ServiceAccount};

/// Extra fields of a bound service-account token naming its pod.
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// Asks the API server whose `token` is. `Ok(Err(reason))` is a token the
/// server did not accept for `audience`; `Err` is a failure to ask.
pub async fn review(
    client: &kube::Client,
    token: &str,
    audience: &str,
) -> Result<Result<Caller, String>, kube::Error> {
    let request = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            audiences: Some(vec![audience.to_owned()]),
        },
        ..TokenReview::default()
    };
    let reviewed = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &request)
        .await?;
    Ok(caller(reviewed.status.unwrap_or_default(), audience))
}

/// The caller a review's status describes, or why there is none.
pub fn caller(status: TokenReviewStatus, audience: &str) -> Result<Caller, String> {
    if status.authenticated != Some(true) {
        return Err(status
            .error
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| "token not authenticated".into()));
    }
    // The server answers with the requested audiences the token is valid for.
    if !status
        .audiences
        .as_deref()
        .unwrap_or_default()
        .iter()
        .any(|a| a == audience)
    {
        return Err(format!("token is not valid for audience {audience:?}"));
    }
    let user = status.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let service_account = ServiceAccount::from_username(&username)
        .ok_or_else(|| format!("{username:?} is not a service account"))?;
    let extra = user.extra.unwrap_or_default();
    let first = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
    let pod = match (first(POD_NAME), first(POD_UID)) {
        (Some(name), Some(uid)) => Some(BoundPod { name, uid }),
        _ => None,
    };
    Ok(Caller {
        service_account,
        pod,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;

    fn status(authenticated: bool, audiences: &[&str], username: &str) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(authenticated),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            user: Some(UserInfo {
                username: Some(username.into()),
                extra: Some(
                    [
                        (POD_NAME.to_owned(), vec!["agent-a".to_owned()]),
                        (POD_UID.to_owned(), vec!["uid-a".to_owned()]),
                    ]
                    .into(),
                ),
                ..UserInfo::default()
            }),
            error: None,
        }
    }

    #[test]
    fn reviews_become_callers_or_reasons() {
        let ok = caller(
            status(
                true,
                &["istio-ca"],
                "system:serviceaccount:nodemesh-system:nodemesh-agent",
            ),
            "istio-ca",
        )
        .unwrap();
        assert_eq!(
            ok.service_account,
            ServiceAccount::new("nodemesh-system", "nodemesh-agent")
        );
        assert_eq!(ok.pod.unwrap().uid, "uid-a");
        let wrong_audience = caller(
            status(true, &["api"], "system:serviceaccount:a:b"),
            "istio-ca",
        );
        assert!(wrong_audience.unwrap_err().contains("audience"));
        let user = caller(status(true, &["istio-ca"], "alice"), "istio-ca");
        assert!(user.unwrap_err().contains("not a service account"));
        let mut expired = status(false, &[], "");
        expired.error = Some("token has expired".into());
        assert_eq!(
            caller(expired, "istio-ca").unwrap_err(),
            "token has expired"
        );
    }
}
