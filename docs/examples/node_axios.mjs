import axios from "axios";

const ORG = "0c2a1d53-5a44-4c1a-9f7e-3f7cc1d7e0aa";

// prefix form (axios throws on a non-2xx answer)
const sidekey = axios.create({
  baseURL: "http://127.0.0.1:8080/m3ter",
  headers: { "x-sidekey-tenant": "acme" },
  timeout: 30000,
});
await sidekey.get(`/organizations/${ORG}/meters`);

// proxy form: axios sends http:// URLs to the proxy as plain requests, with
// Proxy-Authorization from auth
const r = await axios.get("http://online.miradore.com/acme/api/v2/Device", {
  proxy: { protocol: "http", host: "127.0.0.1", port: 8080, auth: { username: "acme", password: "x" } },
  timeout: 30000,
});
console.log(r.data);
