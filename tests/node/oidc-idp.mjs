// Test OpenID Provider for tests/test_oidc.py: panva's oidc-provider 8.8.1 (Node 20, and the Node 24 of runtime/).
//   node oidc-idp.mjs '{"bff": "http://127.0.0.1:8000", "secret": "..."}'   (or "clientJwks": {"keys": [...]})
// Optional: "port" (0 = free port), "host" for the issuer ("localhost" puts the IdP on another *site* than a BFF on
// 127.0.0.1, so SameSite rules apply as in production), "clientId", "accessTokenTtl" (s), "backchannelUri".
// stdout: {"issuer": ...} once listening, then one JSON line per event (errors carry the hidden detail) and per
// token issued ({"event": "token", "value": ...}, for the leak scan). Test-only control routes, loopback only:
//   POST /_test/disable?sub=S      S's refresh tokens stop working (account "gone": invalid_grant)
//   POST /_test/backchannel?sub=S  POSTs a logout token for S's latest IdP session to the BFF and answers
//                                  {"status": <BFF's status>, "logout_token": "..."} so a test can replay it
//   POST /_test/tamper             the next token response carries an ID token with a forged payload
import { randomUUID } from "node:crypto";
import * as http from "node:http";
import Provider from "oidc-provider";

const config = JSON.parse(process.argv[2] ?? "{}");
const bff = config.bff ?? "http://127.0.0.1:8000";
const clientId = config.clientId ?? "workflow-bff";
const server = http.createServer();
await new Promise((resolve) => server.listen(config.port ?? 0, "127.0.0.1", resolve));
// Byte-for-byte what the BFF must be configured with (no trailing slash). Listens on 127.0.0.1 only.
const issuer = `http://${config.host ?? "127.0.0.1"}:${server.address().port}`;
const say = (line) => process.stdout.write(`${JSON.stringify(line)}\n`);
const disabled = new Set();
const lastSid = new Map(); // sub -> sid of the BFF's authorization in that sub's latest IdP session
let tamperNext = false;

const provider = new Provider(issuer, {
  clients: [{
    client_id: clientId,
    ...(config.clientJwks
      ? { token_endpoint_auth_method: "private_key_jwt", jwks: config.clientJwks }
      : { token_endpoint_auth_method: "client_secret_basic", client_secret: config.secret ?? "test-client-secret-0123456789abcdef" }),
    grant_types: ["authorization_code", "refresh_token"],
    response_types: ["code"],
    redirect_uris: [`${bff}/auth/callback`],
    post_logout_redirect_uris: [`${bff}/`],
    backchannel_logout_uri: config.backchannelUri ?? `${bff}/auth/backchannel-logout`,
    backchannel_logout_session_required: true, // logout tokens (and ID tokens) carry `sid`
  }],
  pkce: { methods: ["S256"], required: () => true },
  conformIdTokenClaims: false, // profile claims in the ID token too, as Keycloak, Auth0, Entra and Google do
  scopes: ["openid", "offline_access", "profile", "email"],
  claims: { openid: ["sub"], profile: ["name", "preferred_username"], email: ["email", "email_verified"] },
  async findAccount(ctx, sub) {
    if (disabled.has(sub)) return undefined;
    return { accountId: sub, claims: async () => ({ sub, name: `Test ${sub}`, preferred_username: sub, email: `${sub}@example.test`, email_verified: true }) };
  },
  features: {
    devInteractions: { enabled: true }, // built-in login page: any login, any password; then a consent page
    revocation: { enabled: true },
    rpInitiatedLogout: { enabled: true },
    backchannelLogout: { enabled: true },
  },
  // Refresh tokens only with offline_access, which this provider honours only together with prompt=consent.
  issueRefreshToken: async (ctx, client, code) => client.grantTypeAllowed("refresh_token") && code.scopes.has("offline_access"),
  rotateRefreshToken: true, // reusing a rotated refresh token revokes the whole grant: racing refreshes end the login
  ttl: { AccessToken: config.accessTokenTtl ?? 30, IdToken: 3600, RefreshToken: 86400, Session: 86400, Grant: 86400, Interaction: 600 },
  cookies: {
    keys: ["test-cookie-key-not-secret"],
    long: { signed: true, sameSite: "lax" }, // the default "none" needs Secure, which plain http cannot give
    short: { signed: true, sameSite: "lax" },
  },
  // no `jwks`: 8.x makes a throwaway RS256 signing key (kid "keystore-CHANGE-ME") and warns on stderr
});

provider.on("authorization.success", (ctx) => {
  const { session, client } = ctx.oidc;
  if (session?.accountId && client) lastSid.set(session.accountId, session.sidFor(client.clientId));
});
for (const event of ["grant.success", "grant.error", "grant.revoked", "authorization.error", "revocation.error",
  "backchannel.success", "backchannel.error", "end_session.success", "end_session.error"]) {
  provider.on(event, (...args) => {
    const err = args.find((a) => a instanceof Error);
    say({ event, ...(err ? { error: err.message, detail: err.error_detail } : {}) });
  });
}
for (const kind of ["access_token", "refresh_token", "authorization_code"]) {
  provider.on(`${kind}.saved`, (token) => say({ event: "token", kind, value: token.jti })); // opaque value = jti
}

provider.use(async (ctx, next) => { // runs before the provider's own routes
  if (!ctx.path.startsWith("/_test/")) {
    await next();
    if (tamperNext && ctx.path === "/token" && ctx.body?.id_token) {
      tamperNext = false; // new payload, old signature
      const [h, p, sig] = ctx.body.id_token.split(".");
      const forged = { ...JSON.parse(Buffer.from(p, "base64url")), sub: "mallory" };
      ctx.body = { ...ctx.body, id_token: [h, Buffer.from(JSON.stringify(forged)).toString("base64url"), sig].join(".") };
    }
    return;
  }
  if (ctx.method !== "POST") ctx.throw(405);
  const { sub } = ctx.query;
  if (ctx.path === "/_test/tamper") {
    tamperNext = true;
    ctx.status = 204;
  } else if (ctx.path === "/_test/disable" && typeof sub === "string") {
    disabled.add(sub);
    ctx.status = 204;
  } else if (ctx.path === "/_test/backchannel" && lastSid.has(sub)) {
    const client = await provider.Client.find(clientId); // as Client#backchannelLogout, but the token is returned
    const token = new provider.IdToken({ sub }, { client });
    token.mask = { sub: null };
    token.set("events", { "http://schemas.openid.net/event/backchannel-logout": {} });
    token.set("jti", randomUUID());
    token.set("sid", lastSid.get(sub));
    const logoutToken = await token.issue({ use: "logout" }); // typ logout+jwt, exp = iat + 120
    const answer = await fetch(client.backchannelLogoutUri, { method: "POST", body: new URLSearchParams({ logout_token: logoutToken }) });
    ctx.body = { status: answer.status, logout_token: logoutToken };
  } else {
    ctx.throw(404);
  }
});

server.on("request", provider.callback());
say({ issuer });
for (const signal of ["SIGTERM", "SIGINT"]) process.on(signal, () => process.exit(0));
