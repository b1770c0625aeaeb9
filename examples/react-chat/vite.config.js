import { defineConfig } from "vite";
import react from "@vitejs/plugin-react";

// `npm run dev` serves the app on :5173 and forwards /auth and /api (and /_emulator, below) to
// workflow-bff at BFF_URL, so the browser sees one origin and the session cookie goes along by itself.
const target = process.env.BFF_URL ?? "http://127.0.0.1:8000";
const bff = new URL(target);

// The browser's Host is forwarded as it is (changeOrigin: false). workflow-bff's CSRF check compares a
// POST's Origin with the request's own origin, so the page's Origin (http://localhost:5173) has to
// arrive with Host: localhost:5173, as behind any same-host reverse proxy. Vite's string shorthand
// (`"/api": bff`) sets changeOrigin: true instead: Host becomes 127.0.0.1:8000 while the Origin stays
// the page's, and every sign-in and Send is refused with 403 "This origin is not allowed."
const forward = { target, changeOrigin: false };

// Token mode streams from the `stream_url` that POST /api/token returns, straight from the upstream.
// The emulated upstream of `make run` lives inside workflow-bff (under /_emulator), so that URL is on
// workflow-bff's own address: for this page another origin, whose JSON POST needs a CORS preflight.
// So the dev server forwards /_emulator too, and points a stream_url on workflow-bff's address at
// itself: the page then streams from its own origin, as the demo page of `make run` does. A real
// upstream's stream_url (another host, which answers the preflight itself) is passed on untouched.
const tokenMint = {
  ...forward,
  selfHandleResponse: true,
  configure(proxy) {
    proxy.on("proxyReq", (request) => request.removeHeader("accept-encoding")); // a body we can read
    proxy.on("proxyRes", (answer, request, response) => {
      const chunks = [];
      answer.on("data", (chunk) => chunks.push(chunk));
      answer.on("end", () => {
        let body = Buffer.concat(chunks);
        const { "transfer-encoding": _, ...headers } = answer.headers;
        const minted = answer.statusCode === 200 ? JSON.parse(body.toString("utf8")) : null;
        const upstream = minted && new URL(minted.stream_url);
        if (upstream?.origin === bff.origin) {
          const devServer = `${request.socket.encrypted ? "https" : "http"}://${request.headers.host}`;
          minted.stream_url = new URL(upstream.pathname + upstream.search, devServer).href;
          body = Buffer.from(JSON.stringify(minted));
        }
        headers["content-length"] = String(body.length);
        response.writeHead(answer.statusCode, headers);
        response.end(body);
      });
    });
  },
};

export default defineConfig({
  plugins: [react()],
  // Matched in order: the token route before the rest of /api.
  server: { proxy: { "/api/token": tokenMint, "/auth": forward, "/api": forward, "/_emulator": forward } },
});
