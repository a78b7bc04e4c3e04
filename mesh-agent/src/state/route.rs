//! Gateway API `HTTPRoute` in GAMMA mesh mode: parsing, and the pure choice of
//! which rule serves a request. Nothing here does I/O, so the whole precedence
//! order of the spec is tested table-driven.

use std::collections::BTreeMap;
use std::time::Duration;

use http::{HeaderMap, Method};
use serde::{Deserialize, Serialize, Serializer};

/// The API group of nodemesh's own kinds, as `ExtensionRef` filters name it.
pub const API_GROUP: &str = "nodemesh.io";

/// The API version routes are read in.
pub const GATEWAY_V1: &str = "gateway.networking.k8s.io/v1";

/// A compiled regular expression that compares and prints as its source.
#[derive(Debug, Clone)]
pub struct Pattern(regex::Regex);

impl Pattern {
    /// Compiles `source`, anchored so it must match the whole value, as the spec says.
    pub fn new(source: &str) -> Result<Self, String> {
        regex::Regex::new(&format!("^(?:{source})$"))
            .map(Pattern)
            .map_err(|e| e.to_string())
    }

    fn is_match(&self, s: &str) -> bool {
        self.0.is_match(s)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.as_str())
    }
}

/// An `HTTPRoute` attached to one or more Services.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    /// Route name.
    pub name: String,
    /// Route namespace: the Service's (a producer route) or a client's (a consumer route).
    pub namespace: String,
    /// The Services (and optionally ports) it attaches to.
    pub parents: Vec<ParentRef>,
    /// Rules in declared order.
    pub rules: Vec<Rule>,
}

impl HttpRoute {
    /// `namespace/name`, the `route` metric label.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A Service the route attaches to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    /// Service namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
    /// Only this Service port, or all of them.
    pub port: Option<u16>,
}

/// One routing rule.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// Any one must match; empty means every request.
    pub matches: Vec<RequestMatch>,
    /// Applied in order.
    pub filters: Vec<Filter>,
    /// Weighted destinations.
    pub backends: Vec<BackendRef>,
    /// Whole-request and per-attempt limits.
    pub timeouts: Timeouts,
    /// Retries on failure, if configured.
    pub retry: Option<Retry>,
}

/// Conditions that must all hold.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestMatch {
    /// Path condition (default: prefix `/`).
    pub path: PathMatch,
    /// Header conditions; names are lowercase.
    pub headers: Vec<ValueMatch>,
    /// Query parameter conditions.
    pub query_params: Vec<ValueMatch>,
    /// Method condition.
    #[serde(serialize_with = "serialize_method")]
    pub method: Option<Method>,
}

fn serialize_method<S: Serializer>(m: &Option<Method>, s: S) -> Result<S::Ok, S::Error> {
    match m {
        Some(m) => s.serialize_str(m.as_str()),
        None => s.serialize_none(),
    }
}

/// How a path is matched.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum PathMatch {
    /// The whole path.
    Exact(String),
    /// Whole `/`-separated segments from the start.
    PathPrefix(String),
    /// The whole path against a regular expression.
    RegularExpression(Pattern),
}

/// A named header or query parameter condition.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ValueMatch {
    /// Header (lowercase) or parameter name.
    pub name: String,
    /// What its value must be.
    pub value: StringMatch,
}

/// An exact or regular-expression string condition.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum StringMatch {
    /// Equal.
    Exact(String),
    /// Matches the whole value.
    RegularExpression(Pattern),
}

impl StringMatch {
    fn matches(&self, s: &str) -> bool {
        match self {
            StringMatch::Exact(v) => v == s,
            StringMatch::RegularExpression(p) => p.is_match(s),
        }
    }
}

/// A rule filter.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Filter {
    /// Change request headers before forwarding.
    RequestHeaderModifier(HeaderModifier),
    /// Change response headers before returning.
    ResponseHeaderModifier(HeaderModifier),
    /// Answer with a redirect instead of forwarding.
    RequestRedirect(Redirect),
    /// Rewrite host or path before forwarding.
    UrlRewrite(Rewrite),
    /// Send a copy to another Service and ignore its answer.
    RequestMirror(Mirror),
    /// A nodemesh filter document (`FaultInjection`, `LocalRateLimit`) in the route's namespace.
    ExtensionRef {
        /// The document kind.
        kind: String,
        /// The document name.
        name: String,
    },
}

/// Header edits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HeaderModifier {
    /// Replace or create.
    pub set: Vec<(String, String)>,
    /// Append.
    pub add: Vec<(String, String)>,
    /// Delete.
    pub remove: Vec<String>,
}

impl HeaderModifier {
    /// Applies the edits to `headers`. Values were validated at load.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.set {
            if let (Ok(n), Ok(v)) = (
                http::HeaderName::from_bytes(name.as_bytes()),
                http::HeaderValue::from_str(value),
            ) {
                headers.insert(n, v);
            }
        }
        for (name, value) in &self.add {
            if let (Ok(n), Ok(v)) = (
                http::HeaderName::from_bytes(name.as_bytes()),
                http::HeaderValue::from_str(value),
            ) {
                headers.append(n, v);
            }
        }
        for name in &self.remove {
            headers.remove(name.as_str());
        }
    }
}

/// A path replacement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum PathModifier {
    /// Replace the whole path.
    ReplaceFullPath(String),
    /// Replace the part the rule's `PathPrefix` matched.
    ReplacePrefixMatch(String),
}

/// A `RequestRedirect` filter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Redirect {
    /// `http` or `https`.
    pub scheme: Option<String>,
    /// New host.
    pub hostname: Option<String>,
    /// New path.
    pub path: Option<PathModifier>,
    /// New port.
    pub port: Option<u16>,
    /// 301 or 302.
    pub status_code: u16,
}

/// A `URLRewrite` filter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rewrite {
    /// New `Host`.
    pub hostname: Option<String>,
    /// New path.
    pub path: Option<PathModifier>,
}

/// A `RequestMirror` filter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mirror {
    /// Where copies go.
    pub backend: BackendRef,
    /// Share of requests copied, 0-100.
    pub percent: u32,
}

/// A weighted Service destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackendRef {
    /// Service namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
    /// Service port; defaults to the port the client used.
    pub port: Option<u16>,
    /// Relative share.
    pub weight: u32,
}

/// `timeouts` of a rule; `None` means no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    /// From the request arriving to the response headers, retries included.
    #[serde(with = "humantime_serde_opt")]
    pub request: Option<Duration>,
    /// One attempt to one backend.
    #[serde(with = "humantime_serde_opt")]
    pub backend_request: Option<Duration>,
}

/// GEP-1731 `retry`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Retry {
    /// Status codes worth retrying. Connect failures and resets always are.
    pub codes: Vec<u16>,
    /// Retries after the first attempt.
    pub attempts: u32,
    /// Pause before each retry (doubled each time, with jitter).
    #[serde(with = "humantime_serde_opt")]
    pub backoff: Option<Duration>,
}

mod humantime_serde_opt {
    use serde::Serializer;
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }
}

/// Which rule, if any, serves a request to a Service port.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Selection<'r> {
    /// No route is attached: the Service itself is the backend.
    NoRoutes,
    /// Routes are attached but none matches: 404, as GAMMA requires.
    NoMatch,
    /// The winning rule.
    Rule {
        /// The route holding it.
        route: &'r HttpRoute,
        /// The rule.
        rule: &'r Rule,
        /// The index of the rule in the route, for logs.
        index: usize,
    },
}

/// The request facts a rule can match on.
pub struct RequestFacts<'a> {
    /// Method.
    pub method: &'a Method,
    /// Path without the query.
    pub path: &'a str,
    /// Raw query string.
    pub query: Option<&'a str>,
    /// Headers.
    pub headers: &'a HeaderMap,
}

/// (path class, path length, has method, header count, query count); larger wins.
type Precedence = (u8, usize, bool, usize, usize);

/// Spec precedence: exact path, then longer prefix, then method, then more header
/// and query matches; ties go to the earlier route and rule.
fn precedence(m: &RequestMatch) -> Precedence {
    let (class, len) = match &m.path {
        PathMatch::Exact(p) => (3, p.len()),
        PathMatch::PathPrefix(p) => (2, p.len()),
        PathMatch::RegularExpression(_) => (1, 0),
    };
    (
        class,
        len,
        m.method.is_some(),
        m.headers.len(),
        m.query_params.len(),
    )
}

/// Picks the rule for a request among `routes` (already narrowed to the client's
/// view: consumer routes if any, else producer routes), in the order given.
pub fn select<'r>(
    routes: &'r [std::sync::Arc<HttpRoute>],
    req: &RequestFacts<'_>,
) -> Selection<'r> {
    if routes.is_empty() {
        return Selection::NoRoutes;
    }
    let mut best: Option<(Precedence, Selection<'r>)> = None;
    for route in routes {
        for (index, rule) in route.rules.iter().enumerate() {
            let candidate = if rule.matches.is_empty() {
                Some((2, 1, false, 0, 0))
            } else {
                rule.matches
                    .iter()
                    .filter(|m| matches(m, req))
                    .map(precedence)
                    .max()
            };
            if let Some(key) = candidate
                && best.as_ref().is_none_or(|(b, _)| key > *b)
            {
                best = Some((key, Selection::Rule { route, rule, index }));
            }
        }
    }
    best.map(|(_, s)| s).unwrap_or(Selection::NoMatch)
}

fn matches(m: &RequestMatch, req: &RequestFacts<'_>) -> bool {
    let path_ok = match &m.path {
        PathMatch::Exact(p) => req.path == p,
        PathMatch::PathPrefix(p) => prefix_matches(p, req.path),
        PathMatch::RegularExpression(re) => re.is_match(req.path),
    };
    path_ok
        && m.method.as_ref().is_none_or(|method| method == req.method)
        && m.headers.iter().all(|h| {
            req.headers
                .get_all(h.name.as_str())
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| h.value.matches(v)))
        })
        && m.query_params.iter().all(|q| {
            query_pairs(req.query).any(|(name, value)| name == q.name && q.value.matches(value))
        })
}

/// `/foo` matches `/foo`, `/foo/` and `/foo/bar`, never `/foobar`.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

fn query_pairs(query: Option<&str>) -> impl Iterator<Item = (&str, &str)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
}

/// The path after a rewrite or redirect. `matched_prefix` is the rule's
/// `PathPrefix`, needed by `ReplacePrefixMatch`.
pub fn rewrite_path(modifier: &PathModifier, matched_prefix: Option<&str>, path: &str) -> String {
    match modifier {
        PathModifier::ReplaceFullPath(p) => p.clone(),
        PathModifier::ReplacePrefixMatch(replacement) => {
            let prefix = matched_prefix.unwrap_or("/").trim_end_matches('/');
            let rest = path.strip_prefix(prefix).unwrap_or(path);
            let replacement = replacement.trim_end_matches('/');
            match (replacement.is_empty(), rest.is_empty()) {
                (true, true) => "/".to_owned(),
                (true, false) => rest.to_owned(),
                (false, _) => format!("{replacement}{rest}"),
            }
        }
    }
}

/// The `PathPrefix` of the first match of `rule` that matches the request, for
/// `ReplacePrefixMatch`.
pub fn matched_prefix<'r>(rule: &'r Rule, req: &RequestFacts<'_>) -> Option<&'r str> {
    rule.matches
        .iter()
        .filter(|m| matches(m, req))
        .find_map(|m| match &m.path {
            PathMatch::PathPrefix(p) => Some(p.as_str()),
            _ => None,
        })
}

// ---- parsing ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawHttpRouteSpec {
    #[serde(default)]
    parent_refs: Vec<RawParentRef>,
    #[serde(default)]
    hostnames: Vec<String>,
    #[serde(default)]
    rules: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawParentRef {
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    name: String,
    #[serde(default)]
    port: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRule {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    matches: Vec<RawMatch>,
    #[serde(default)]
    filters: Vec<RawFilter>,
    #[serde(default)]
    backend_refs: Vec<RawBackendRef>,
    #[serde(default)]
    timeouts: Option<RawTimeouts>,
    #[serde(default)]
    retry: Option<RawRetry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawMatch {
    #[serde(default)]
    path: Option<RawTypedValue>,
    #[serde(default)]
    headers: Vec<RawNamedMatch>,
    #[serde(default)]
    query_params: Vec<RawNamedMatch>,
    #[serde(default)]
    method: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTypedValue {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    value: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNamedMatch {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    name: String,
    value: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawFilter {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    request_header_modifier: Option<RawHeaderModifier>,
    #[serde(default)]
    response_header_modifier: Option<RawHeaderModifier>,
    #[serde(default)]
    request_redirect: Option<RawRedirect>,
    #[serde(default, rename = "urlRewrite")]
    url_rewrite: Option<RawRewrite>,
    #[serde(default)]
    request_mirror: Option<RawMirror>,
    #[serde(default)]
    extension_ref: Option<RawExtensionRef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeaderModifier {
    #[serde(default)]
    set: Vec<RawHeader>,
    #[serde(default)]
    add: Vec<RawHeader>,
    #[serde(default)]
    remove: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeader {
    name: String,
    value: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRedirect {
    #[serde(default)]
    scheme: Option<String>,
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    path: Option<RawPathModifier>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    status_code: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRewrite {
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    path: Option<RawPathModifier>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPathModifier {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    replace_full_path: Option<String>,
    #[serde(default)]
    replace_prefix_match: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawMirror {
    backend_ref: RawBackendRef,
    #[serde(default)]
    percent: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExtensionRef {
    group: String,
    kind: String,
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawBackendRef {
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    weight: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawTimeouts {
    #[serde(default)]
    request: Option<String>,
    #[serde(default)]
    backend_request: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    #[serde(default)]
    codes: Vec<u16>,
    #[serde(default)]
    attempts: Option<u32>,
    #[serde(default)]
    backoff: Option<String>,
}

type FieldError = (String, String);

/// Gateway API durations (`500ms`, `10s`, `1h30m`); `0s` means no limit.
pub fn parse_duration(field: &str, text: &str) -> Result<Option<Duration>, FieldError> {
    let d = humantime::parse_duration(text)
        .map_err(|e| (field.to_owned(), format!("{text:?} is not a duration: {e}")))?;
    Ok((!d.is_zero()).then_some(d))
}

fn is_service_ref(group: Option<&str>, kind: Option<&str>) -> bool {
    group.unwrap_or("").is_empty() && kind.unwrap_or("Service") == "Service"
}

impl HttpRoute {
    /// Validates a parsed spec; errors name the field at fault.
    pub(crate) fn from_raw(
        name: String,
        namespace: String,
        spec: RawHttpRouteSpec,
    ) -> Result<HttpRoute, FieldError> {
        let _ = spec.hostnames; // GAMMA routes match on the Service, not the Host header.
        if spec.parent_refs.is_empty() {
            return Err((
                "spec.parentRefs".into(),
                "at least one Service parent is required (GAMMA mesh routing)".into(),
            ));
        }
        let mut parents = Vec::new();
        for (i, p) in spec.parent_refs.into_iter().enumerate() {
            if !is_service_ref(p.group.as_deref(), p.kind.as_deref()) {
                return Err((
                    format!("spec.parentRefs[{i}]"),
                    "only Service parents (group \"\", kind Service) are supported; Gateways are not".into(),
                ));
            }
            parents.push(ParentRef {
                namespace: p.namespace.unwrap_or_else(|| namespace.clone()),
                name: p.name,
                port: p.port,
            });
        }
        if spec.rules.is_empty() {
            return Err(("spec.rules".into(), "at least one rule is required".into()));
        }
        let mut rules = Vec::new();
        for (i, r) in spec.rules.into_iter().enumerate() {
            rules.push(build_rule(&format!("spec.rules[{i}]"), &namespace, r)?);
        }
        Ok(HttpRoute {
            name,
            namespace,
            parents,
            rules,
        })
    }
}

fn build_rule(field: &str, namespace: &str, r: RawRule) -> Result<Rule, FieldError> {
    let _ = r.name;
    if r.matches.len() > 64 {
        return Err((format!("{field}.matches"), "at most 64 matches".into()));
    }
    let mut matches = Vec::new();
    for (j, m) in r.matches.into_iter().enumerate() {
        matches.push(build_match(&format!("{field}.matches[{j}]"), m)?);
    }
    let mut filters = Vec::new();
    for (j, f) in r.filters.into_iter().enumerate() {
        filters.push(build_filter(
            &format!("{field}.filters[{j}]"),
            namespace,
            f,
        )?);
    }
    let has_redirect = filters
        .iter()
        .any(|f| matches!(f, Filter::RequestRedirect(_)));
    if has_redirect && filters.iter().any(|f| matches!(f, Filter::UrlRewrite(_))) {
        return Err((
            format!("{field}.filters"),
            "RequestRedirect and URLRewrite cannot be combined".into(),
        ));
    }
    let mut backends = Vec::new();
    for (j, b) in r.backend_refs.into_iter().enumerate() {
        backends.push(build_backend(
            &format!("{field}.backendRefs[{j}]"),
            namespace,
            b,
        )?);
    }
    if backends.is_empty() && !has_redirect {
        return Err((
            format!("{field}.backendRefs"),
            "a rule without a RequestRedirect needs at least one backendRef".into(),
        ));
    }
    let timeouts = match r.timeouts {
        None => Timeouts::default(),
        Some(t) => Timeouts {
            request: t
                .request
                .as_deref()
                .map(|s| parse_duration(&format!("{field}.timeouts.request"), s))
                .transpose()?
                .flatten(),
            backend_request: t
                .backend_request
                .as_deref()
                .map(|s| parse_duration(&format!("{field}.timeouts.backendRequest"), s))
                .transpose()?
                .flatten(),
        },
    };
    if let (Some(req), Some(backend)) = (timeouts.request, timeouts.backend_request)
        && backend > req
    {
        return Err((
            format!("{field}.timeouts.backendRequest"),
            "must not exceed timeouts.request".into(),
        ));
    }
    let retry = match r.retry {
        None => None,
        Some(raw) => {
            if let Some(code) = raw.codes.iter().find(|c| !(400..=599).contains(*c)) {
                return Err((
                    format!("{field}.retry.codes"),
                    format!("{code} is not a 4xx or 5xx status"),
                ));
            }
            let attempts = raw.attempts.unwrap_or(1);
            if attempts > 10 {
                return Err((
                    format!("{field}.retry.attempts"),
                    "at most 10 retries".into(),
                ));
            }
            Some(Retry {
                codes: raw.codes,
                attempts,
                backoff: raw
                    .backoff
                    .as_deref()
                    .map(|s| parse_duration(&format!("{field}.retry.backoff"), s))
                    .transpose()?
                    .flatten(),
            })
        }
    };
    Ok(Rule {
        matches,
        filters,
        backends,
        timeouts,
        retry,
    })
}

fn build_match(field: &str, m: RawMatch) -> Result<RequestMatch, FieldError> {
    let path = match m.path {
        None => PathMatch::PathPrefix("/".into()),
        Some(p) => {
            let value = p.value.unwrap_or_else(|| "/".into());
            match p.kind.as_deref().unwrap_or("PathPrefix") {
                "Exact" | "PathPrefix" if !value.starts_with('/') => {
                    return Err((format!("{field}.path.value"), "must start with /".into()));
                }
                "Exact" => PathMatch::Exact(value),
                "PathPrefix" => PathMatch::PathPrefix(value),
                "RegularExpression" => PathMatch::RegularExpression(
                    Pattern::new(&value).map_err(|e| (format!("{field}.path.value"), e))?,
                ),
                other => {
                    return Err((
                        format!("{field}.path.type"),
                        format!("{other:?} (expected Exact, PathPrefix or RegularExpression)"),
                    ));
                }
            }
        }
    };
    let named = |list: Vec<RawNamedMatch>,
                 what: &str,
                 lowercase: bool|
     -> Result<Vec<ValueMatch>, FieldError> {
        list.into_iter()
            .enumerate()
            .map(|(k, h)| {
                let f = format!("{field}.{what}[{k}]");
                let value = match h.kind.as_deref().unwrap_or("Exact") {
                    "Exact" => StringMatch::Exact(h.value),
                    "RegularExpression" => StringMatch::RegularExpression(
                        Pattern::new(&h.value).map_err(|e| (format!("{f}.value"), e))?,
                    ),
                    other => {
                        return Err((
                            format!("{f}.type"),
                            format!("{other:?} (expected Exact or RegularExpression)"),
                        ));
                    }
                };
                if lowercase && http::HeaderName::from_bytes(h.name.as_bytes()).is_err() {
                    return Err((
                        format!("{f}.name"),
                        format!("{:?} is not a header name", h.name),
                    ));
                }
                Ok(ValueMatch {
                    name: if lowercase {
                        h.name.to_ascii_lowercase()
                    } else {
                        h.name
                    },
                    value,
                })
            })
            .collect()
    };
    let method = m
        .method
        .map(|s| match s.as_str() {
            "GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "CONNECT" | "OPTIONS" | "TRACE"
            | "PATCH" => Ok(Method::from_bytes(s.as_bytes()).expect("standard method")),
            _ => Err((
                format!("{field}.method"),
                format!("{s:?} is not an HTTP method"),
            )),
        })
        .transpose()?;
    Ok(RequestMatch {
        path,
        headers: named(m.headers, "headers", true)?,
        query_params: named(m.query_params, "queryParams", false)?,
        method,
    })
}

fn build_headers(field: &str, m: RawHeaderModifier) -> Result<HeaderModifier, FieldError> {
    let check = |list: Vec<RawHeader>, what: &str| -> Result<Vec<(String, String)>, FieldError> {
        list.into_iter()
            .enumerate()
            .map(|(k, h)| {
                http::HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| {
                    (
                        format!("{field}.{what}[{k}].name"),
                        format!("{:?} is not a header name", h.name),
                    )
                })?;
                http::HeaderValue::from_str(&h.value).map_err(|_| {
                    (
                        format!("{field}.{what}[{k}].value"),
                        "not a valid header value".into(),
                    )
                })?;
                Ok((h.name.to_ascii_lowercase(), h.value))
            })
            .collect()
    };
    Ok(HeaderModifier {
        set: check(m.set, "set")?,
        add: check(m.add, "add")?,
        remove: m
            .remove
            .into_iter()
            .map(|h| h.to_ascii_lowercase())
            .collect(),
    })
}

fn build_path_modifier(field: &str, p: RawPathModifier) -> Result<PathModifier, FieldError> {
    match (p.kind.as_str(), p.replace_full_path, p.replace_prefix_match) {
        ("ReplaceFullPath", Some(path), None) => Ok(PathModifier::ReplaceFullPath(path)),
        ("ReplacePrefixMatch", None, Some(path)) => Ok(PathModifier::ReplacePrefixMatch(path)),
        (kind, _, _) => Err((
            field.to_owned(),
            format!(
                "type {kind:?} needs exactly its own field (ReplaceFullPath with replaceFullPath, ReplacePrefixMatch with replacePrefixMatch)"
            ),
        )),
    }
}

fn build_filter(field: &str, namespace: &str, f: RawFilter) -> Result<Filter, FieldError> {
    let missing = |what: &str| {
        (
            format!("{field}.{what}"),
            format!("required by type {}", f.kind),
        )
    };
    let filter = match f.kind.as_str() {
        "RequestHeaderModifier" => Filter::RequestHeaderModifier(build_headers(
            &format!("{field}.requestHeaderModifier"),
            f.request_header_modifier
                .ok_or_else(|| missing("requestHeaderModifier"))?,
        )?),
        "ResponseHeaderModifier" => Filter::ResponseHeaderModifier(build_headers(
            &format!("{field}.responseHeaderModifier"),
            f.response_header_modifier
                .ok_or_else(|| missing("responseHeaderModifier"))?,
        )?),
        "RequestRedirect" => {
            let r = f
                .request_redirect
                .ok_or_else(|| missing("requestRedirect"))?;
            let status_code = r.status_code.unwrap_or(302);
            if !matches!(status_code, 301 | 302 | 303 | 307 | 308) {
                return Err((
                    format!("{field}.requestRedirect.statusCode"),
                    format!("{status_code} is not a redirect status"),
                ));
            }
            if let Some(s) = r.scheme.as_deref()
                && !matches!(s, "http" | "https")
            {
                return Err((
                    format!("{field}.requestRedirect.scheme"),
                    format!("{s:?} (expected http or https)"),
                ));
            }
            Filter::RequestRedirect(Redirect {
                scheme: r.scheme,
                hostname: r.hostname,
                path: r
                    .path
                    .map(|p| build_path_modifier(&format!("{field}.requestRedirect.path"), p))
                    .transpose()?,
                port: r.port,
                status_code,
            })
        }
        "URLRewrite" => {
            let r = f.url_rewrite.ok_or_else(|| missing("urlRewrite"))?;
            Filter::UrlRewrite(Rewrite {
                hostname: r.hostname,
                path: r
                    .path
                    .map(|p| build_path_modifier(&format!("{field}.urlRewrite.path"), p))
                    .transpose()?,
            })
        }
        "RequestMirror" => {
            let m = f.request_mirror.ok_or_else(|| missing("requestMirror"))?;
            let percent = m.percent.unwrap_or(100);
            if percent > 100 {
                return Err((
                    format!("{field}.requestMirror.percent"),
                    "must be 0-100".into(),
                ));
            }
            Filter::RequestMirror(Mirror {
                backend: build_backend(
                    &format!("{field}.requestMirror.backendRef"),
                    namespace,
                    m.backend_ref,
                )?,
                percent,
            })
        }
        "ExtensionRef" => {
            let e = f.extension_ref.ok_or_else(|| missing("extensionRef"))?;
            if e.group != crate::state::route::API_GROUP
                || !matches!(e.kind.as_str(), "FaultInjection" | "LocalRateLimit")
            {
                return Err((
                    format!("{field}.extensionRef"),
                    format!(
                        "{}/{} is not supported (expected group {}, kind FaultInjection or LocalRateLimit)",
                        e.group,
                        e.kind,
                        crate::state::route::API_GROUP
                    ),
                ));
            }
            Filter::ExtensionRef {
                kind: e.kind,
                name: e.name,
            }
        }
        other => {
            return Err((
                format!("{field}.type"),
                format!(
                    "{other:?} (expected RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, URLRewrite, RequestMirror or ExtensionRef)"
                ),
            ));
        }
    };
    Ok(filter)
}

fn build_backend(field: &str, namespace: &str, b: RawBackendRef) -> Result<BackendRef, FieldError> {
    if !is_service_ref(b.group.as_deref(), b.kind.as_deref()) {
        return Err((
            field.to_owned(),
            "only Service backends (group \"\", kind Service) are supported".into(),
        ));
    }
    let weight = b.weight.unwrap_or(1);
    if weight > 1_000_000 {
        return Err((format!("{field}.weight"), "must be 0-1000000".into()));
    }
    Ok(BackendRef {
        namespace: b.namespace.unwrap_or_else(|| namespace.to_owned()),
        name: b.name,
        port: b.port,
        weight,
    })
}

/// Route-level config documents by name, for `/config_dump`.
pub type ByName<T> = BTreeMap<String, T>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn route(name: &str, yaml: &str) -> Arc<HttpRoute> {
        let spec: RawHttpRouteSpec = serde_yaml_ng::from_str(yaml).unwrap();
        Arc::new(HttpRoute::from_raw(name.into(), "shop".into(), spec).unwrap())
    }

    fn pick(
        routes: &[Arc<HttpRoute>],
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
    ) -> Option<(String, usize)> {
        let uri: http::Uri = uri.parse().unwrap();
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let facts = RequestFacts {
            method: &method,
            path: uri.path(),
            query: uri.query(),
            headers: &map,
        };
        match select(routes, &facts) {
            Selection::Rule { route, index, .. } => Some((route.name.clone(), index)),
            Selection::NoMatch => None,
            Selection::NoRoutes => Some(("<service>".into(), 0)),
        }
    }

    #[test]
    fn precedence_follows_the_spec() {
        let a = route(
            "a",
            r#"
parentRefs: [{kind: Service, name: web}]
rules:
- matches: [{path: {type: PathPrefix, value: /api}}]
  backendRefs: [{name: api}]
- matches: [{path: {type: Exact, value: /api/health}}]
  backendRefs: [{name: health}]
- matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: X-Canary, value: "1"}]}]
  backendRefs: [{name: canary}]
- matches: [{path: {type: PathPrefix, value: /api/v2}}]
  backendRefs: [{name: v2}]
- matches: [{path: {type: RegularExpression, value: "/img/[0-9]+"}}]
  backendRefs: [{name: img}]
- matches: [{method: DELETE, path: {value: /api}}]
  backendRefs: [{name: del}]
- matches: [{queryParams: [{name: debug, value: "on"}]}]
  backendRefs: [{name: debug}]
"#,
        );
        let b = route(
            "b",
            r#"
parentRefs: [{name: web}]
rules:
- matches: [{path: {type: PathPrefix, value: /api}}]
  backendRefs: [{name: other}]
"#,
        );
        let routes = vec![a, b];
        type Case<'a> = (
            &'a str,
            &'a str,
            &'a [(&'a str, &'a str)],
            Option<(&'a str, usize)>,
        );
        let cases: &[Case] = &[
            ("GET", "/api/x", &[], Some(("a", 0))),
            ("GET", "/api", &[], Some(("a", 0))),
            ("GET", "/apix", &[], None),
            ("GET", "/api/health", &[], Some(("a", 1))),
            ("GET", "/api/x", &[("x-canary", "1")], Some(("a", 2))),
            ("GET", "/api/x", &[("x-canary", "2")], Some(("a", 0))),
            ("GET", "/api/v2/y", &[("x-canary", "1")], Some(("a", 3))),
            ("GET", "/img/42", &[], Some(("a", 4))),
            ("GET", "/img/42x", &[], None),
            ("DELETE", "/api/z", &[], Some(("a", 5))),
            ("GET", "/?debug=on", &[], Some(("a", 6))),
            ("GET", "/?debug=off", &[], None),
        ];
        for (method, uri, headers, expected) in cases {
            let got = pick(&routes, method, uri, headers);
            let expected = expected.map(|(n, i)| (n.to_owned(), i));
            assert_eq!(got, expected, "{method} {uri} {headers:?}");
        }
        assert_eq!(pick(&[], "GET", "/", &[]), Some(("<service>".into(), 0)));
    }

    #[test]
    fn rewrites() {
        let cases = [
            (
                PathModifier::ReplacePrefixMatch("/v2".into()),
                Some("/api"),
                "/api/x",
                "/v2/x",
            ),
            (
                PathModifier::ReplacePrefixMatch("/".into()),
                Some("/api"),
                "/api/x",
                "/x",
            ),
            (
                PathModifier::ReplacePrefixMatch("/".into()),
                Some("/api"),
                "/api",
                "/",
            ),
            (
                PathModifier::ReplacePrefixMatch("/v2/".into()),
                Some("/api/"),
                "/api",
                "/v2",
            ),
            (
                PathModifier::ReplaceFullPath("/new".into()),
                None,
                "/old/x",
                "/new",
            ),
        ];
        for (modifier, prefix, path, expected) in cases {
            assert_eq!(
                rewrite_path(&modifier, prefix, path),
                expected,
                "{modifier:?} {path}"
            );
        }
    }

    #[test]
    fn bad_routes_name_the_field() {
        let cases = [
            ("parentRefs: []\nrules: []", "spec.parentRefs"),
            (
                "parentRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]\nrules: [{backendRefs: [{name: a}]}]",
                "spec.parentRefs[0]",
            ),
            (
                "parentRefs: [{name: web}]\nrules: [{matches: [{path: {type: Regex, value: /a}}], backendRefs: [{name: a}]}]",
                "spec.rules[0].matches[0].path.type",
            ),
            (
                "parentRefs: [{name: web}]\nrules: [{matches: [{path: {type: RegularExpression, value: \"(\"}}], backendRefs: [{name: a}]}]",
                "spec.rules[0].matches[0].path.value",
            ),
            (
                "parentRefs: [{name: web}]\nrules: [{timeouts: {request: 2 fortnights}, backendRefs: [{name: a}]}]",
                "spec.rules[0].timeouts.request",
            ),
            (
                "parentRefs: [{name: web}]\nrules: [{timeouts: {request: 1s, backendRequest: 2s}, backendRefs: [{name: a}]}]",
                "spec.rules[0].timeouts.backendRequest",
            ),
            (
                "parentRefs: [{name: web}]\nrules: [{retry: {codes: [200]}, backendRefs: [{name: a}]}]",
                "spec.rules[0].retry.codes",
            ),
            (
                "parentRefs: [{name: web}]\nrules: [{}]",
                "spec.rules[0].backendRefs",
            ),
            (
                "parentRefs: [{name: web}]\nrules: [{filters: [{type: ExtensionRef, extensionRef: {group: x.io, kind: Foo, name: f}}], backendRefs: [{name: a}]}]",
                "spec.rules[0].filters[0].extensionRef",
            ),
        ];
        for (yaml, field) in cases {
            let spec: RawHttpRouteSpec = serde_yaml_ng::from_str(yaml).unwrap();
            let (f, msg) = HttpRoute::from_raw("r".into(), "shop".into(), spec).unwrap_err();
            assert_eq!(f, field, "{yaml}: {msg}");
        }
    }
}
