import { defineConfig } from "vite";
import react from "@vitejs/plugin-react";

// `npm run dev` serves the app on :5173 and forwards /auth and /api to workflow-bff on :8000, so the
// browser sees one origin: the session cookie and the X-CSRF header work without any CORS setup.
const bff = process.env.BFF_URL ?? "http://127.0.0.1:8000";

export default defineConfig({
  plugins: [react()],
  server: { proxy: { "/auth": bff, "/api": bff } },
});
