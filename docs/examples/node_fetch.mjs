import { ProxyAgent, fetch as undiciFetch } from "undici";

const ORG = "0c2a1d53-5a44-4c1a-9f7e-3f7cc1d7e0aa";

// prefix form with the built-in fetch
const r = await fetch(`http://127.0.0.1:8080/m3ter/organizations/${ORG}/meters`, {
  headers: { "x-sidekey-tenant": "acme" },
});
if (!r.ok) throw new Error(`HTTP ${r.status}: ${await r.text()}`);

// proxy form with undici's ProxyAgent. proxyTunnel: false makes it send http:// URLs to
// the proxy as plain requests; by default it opens a CONNECT tunnel, which sidekey refuses
// (405 connect_unsupported). The built-in fetch ignores HTTP_PROXY on Node 20.
const dispatcher = new ProxyAgent({
  uri: "http://127.0.0.1:8080",
  token: "Basic " + Buffer.from("acme:x").toString("base64"),
  proxyTunnel: false,
});
const p = await undiciFetch("http://online.miradore.com/acme/api/v2/Device", { dispatcher });
if (!p.ok) throw new Error(`HTTP ${p.status}: ${await p.text()}`);
console.log(await p.json());
