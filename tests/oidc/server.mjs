// A real OpenID provider (npm `oidc-provider`, pinned in package.json) for
// tollgate's interoperability tests. Test use only: plain HTTP, keys made up
// at start, everything in memory.
//
// Install once:   cd tests/oidc && npm ci
// Start:          node tests/oidc/server.mjs [PORT]
//                 (or OIDC_PORT=PORT node tests/oidc/server.mjs; PORT 0 or
//                 none picks a free port). It listens on 127.0.0.1 only.
//
// stdout carries exactly two lines (everything else goes to stderr):
//   READY <port>
//   {"issuer":"http://127.0.0.1:<port>","jwks_uri":".../jwks",
//    "token_endpoint":".../token","introspection_endpoint":".../token/introspection",
//    "discovery":".../.well-known/openid-configuration",
//    "jwt_resource":"urn:llama-stack","opaque_resource":"urn:llama-stack:opaque",
//    "audience":"llama-stack","kid":"tollgate-test-rs256",
//    "clients":{"basic":["gw","s3cret"],"post":["gw-post","s3cret"],
//               "special":["gw:special","s3 cr+t&%/~"]}}
//
// Clients (grant client_credentials only; all may introspect):
//   gw / s3cret              client_secret_basic (HTTP Basic, RFC 6749 §2.3.1)
//   gw-post / s3cret         client_secret_post (client_id/client_secret form fields)
//   gw:special / s3 cr+t&%/~ client_secret_basic, credentials that need form-encoding
//
// Tokens (POST the token endpoint, grant_type=client_credentials):
//   resource=urn:llama-stack         → RS256 JWT, header kid in the JWKS,
//                                      aud "llama-stack"
//   resource=urn:llama-stack:opaque  → opaque token (introspect it)
//   no resource                      → opaque token without aud
//   add scope=read%20write to get a `scope` claim ("read write"; the
//   resources allow read, write and admin).
//   e.g. curl -u gw:s3cret -d grant_type=client_credentials \
//          -d resource=urn:llama-stack -d scope=read+write http://127.0.0.1:PORT/token
//   → {"access_token":"eyJ...","expires_in":600,"scope":"read write","token_type":"Bearer"}
// Claims (JWT payload, or the introspection answer of an opaque token):
//   iss "http://127.0.0.1:<port>", sub = the client id, client_id, aud
//   "llama-stack", scope (if asked), iat, exp = iat + OIDC_TOKEN_TTL
//   (seconds, default 600), jti; the JWT header is {"alg":"RS256",
//   "typ":"at+jwt","kid":"tollgate-test-rs256"}.
// Introspection (POST token=..., client credentials as above) answers
//   {"active":true,"sub":"gw","client_id":"gw","exp":...,"iat":...,
//    "iss":"http://127.0.0.1:<port>","aud":"llama-stack","scope":"read write",
//    "token_type":"Bearer"}
// for an opaque token, {"active":false} for an unknown or expired one, 401
// invalid_client for bad client credentials, and 400 unsupported_token_type
// for a JWT (oidc-provider does not introspect structured tokens).
// SIGINT/SIGTERM stop it.

import { generateKeyPairSync } from 'node:crypto';
import http from 'node:http';

import Provider, { errors } from 'oidc-provider';

// oidc-provider prints notices with console.info: keep stdout for our lines.
console.info = (...args) => console.error(...args);
console.log = (...args) => console.error(...args);
const out = (line) => process.stdout.write(`${line}\n`);

const HOST = '127.0.0.1';
const portArg = process.argv[2] ?? process.env.OIDC_PORT ?? process.env.PORT ?? '0';
const port = Number.parseInt(portArg, 10);
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  console.error(`bad port: ${portArg}`);
  process.exit(2);
}
const ttl = Number.parseInt(process.env.OIDC_TOKEN_TTL ?? '600', 10);
if (!Number.isSafeInteger(ttl) || ttl <= 0) {
  console.error(`bad OIDC_TOKEN_TTL: ${process.env.OIDC_TOKEN_TTL}`);
  process.exit(2);
}

const KID = 'tollgate-test-rs256';
const AUDIENCE = 'llama-stack';
const JWT_RESOURCE = 'urn:llama-stack';
const OPAQUE_RESOURCE = 'urn:llama-stack:opaque';
const CLIENTS = {
  basic: ['gw', 's3cret'],
  post: ['gw-post', 's3cret'],
  special: ['gw:special', 's3 cr+t&%/~'],
};

const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const jwk = { ...privateKey.export({ format: 'jwk' }), kid: KID, alg: 'RS256', use: 'sig' };

const resources = {
  [JWT_RESOURCE]: { accessTokenFormat: 'jwt', jwt: { sign: { alg: 'RS256', kid: KID } } },
  [OPAQUE_RESOURCE]: { accessTokenFormat: 'opaque' },
};

const client = (id, secret, method) => ({
  client_id: id,
  client_secret: secret,
  grant_types: ['client_credentials'],
  response_types: [],
  redirect_uris: [],
  token_endpoint_auth_method: method,
  scope: 'read write admin',
});

const configuration = {
  clients: [
    client(...CLIENTS.basic, 'client_secret_basic'),
    client(...CLIENTS.post, 'client_secret_post'),
    client(...CLIENTS.special, 'client_secret_basic'),
  ],
  jwks: { keys: [jwk] },
  scopes: ['openid', 'read', 'write', 'admin'],
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: {
      enabled: true,
      // Any authenticated client may introspect any token (a gateway does).
      allowedPolicy: async () => true,
    },
    revocation: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: async (_ctx, _client, oneOf) => oneOf,
      useGrantedResource: async () => false,
      getResourceServerInfo: async (_ctx, resource) => {
        const r = resources[resource];
        if (!r) throw new errors.InvalidTarget();
        return { scope: 'read write admin', audience: AUDIENCE, accessTokenTTL: ttl, ...r };
      },
    },
  },
  // Client-credentials tokens have no account: give them sub = client id, so
  // introspection answers carry a principal too (the JWT has it already).
  extraTokenClaims: async (_ctx, token) => (
    token.kind === 'ClientCredentials' ? { sub: token.clientId } : undefined
  ),
  ttl: { ClientCredentials: () => ttl, AccessToken: () => ttl },
  clientBasedCORS: () => false,
  pkce: { required: () => false },
};

const server = http.createServer();
server.listen(port, HOST, () => {
  const actual = server.address().port;
  const issuer = `http://${HOST}:${actual}`;
  const provider = new Provider(issuer, configuration);
  provider.on('server_error', (_ctx, err) => console.error('server_error', err));
  server.on('request', provider.callback());
  out(`READY ${actual}`);
  out(JSON.stringify({
    issuer,
    jwks_uri: `${issuer}/jwks`,
    token_endpoint: `${issuer}/token`,
    introspection_endpoint: `${issuer}/token/introspection`,
    discovery: `${issuer}/.well-known/openid-configuration`,
    jwt_resource: JWT_RESOURCE,
    opaque_resource: OPAQUE_RESOURCE,
    audience: AUDIENCE,
    kid: KID,
    clients: CLIENTS,
  }));
});

for (const sig of ['SIGINT', 'SIGTERM']) {
  // In-memory state only: nothing to flush.
  process.on(sig, () => process.exit(0));
}
