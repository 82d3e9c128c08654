"""Screenshot of the worklist with the gate's reasons for the README: docs/screenshots/worklist-reasons.png.

Reads what `gatekeeper demo --out DIR` left behind (its SQLite database under DIR/var, the demo
dosimetrist's login): the normal series was delivered, the stent and the tumour are on the worklist
with the gate's findings in words. Serves the worklist app on it (uvicorn) and photographs it with
headless Chromium (Debian's package) through Playwright.

    .venv/bin/gatekeeper demo --out out/demo < /dev/null
    .venv/bin/python ops/screenshot_worklist.py [--demo out/demo] [--out docs/screenshots]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_viewer import serve  # noqa: E402

from service.commands.demo import DEMO_PASSWORD, DEMO_USER  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--demo", type=Path, default=Path("out/demo"), help="the demo's --out folder")
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    args = parser.parse_args(argv)

    from playwright.sync_api import sync_playwright

    from service.db.session import make_engine, make_session_factory
    from service.settings import Settings
    from service.web.app import create_app

    database = args.demo / "var" / "gatekeeper.db"
    if not database.is_file():
        raise SystemExit(f"{database}: not found; run `gatekeeper demo --out {args.demo}` first")
    settings = Settings(storage_dir=args.demo / "var", web_secret_key="s" * 40)
    engine = make_engine(settings.database_url)
    server, url = serve(create_app(settings, make_session_factory(engine)))
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
            page = browser.new_page(viewport={"width": 1250, "height": 700})
            page.goto(f"{url}/login?next=/")
            page.fill("input[name=name]", DEMO_USER)
            page.fill("input[name=password]", DEMO_PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_selector("table")
            page.screenshot(path=str(args.out / "worklist-reasons.png"), full_page=True)
            browser.close()
    finally:
        server.should_exit = True
        engine.dispose()
    print(f"wrote {args.out / 'worklist-reasons.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
