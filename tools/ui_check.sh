#!/usr/bin/env bash
# Checks in a real browser that the evaluation report's plots render in the Prefect UI:
# starts `prefect server start` (with its UI) on a free port, publishes a report artifact the way the
# evaluate flow does, opens its page in headless Chromium and checks every image loaded (naturalWidth > 0),
# with a relative-path report as the control that must not load. See tests/flows/test_ui_report_images.py.
#
#   tools/ui_check.sh            # from the repository root, in the project's venv
#
# Needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver) and selenium
# (pip install -e '.[test]'). Nothing is downloaded: chromedriver is the Debian one, the UI is Prefect's.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in chromium chromedriver; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found (apt-get install -y chromium chromium-driver)" >&2; exit 2; }
done
python -c "import selenium" 2>/dev/null || { echo "error: selenium not installed (pip install -e '.[test]')" >&2; exit 2; }
exec python -m pytest -q -p no:cacheprovider -m ui -rs tests/flows/test_ui_report_images.py "$@"
