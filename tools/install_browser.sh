#!/usr/bin/env bash
# Installs Debian's Chromium for the test that opens the HTML audit report in a real browser.
# Never fails the set-up: without root/apt-get the test skips with a reason.
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[auditkit setup] installing Debian's chromium (for the HTML report test)"
  if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/tmp/auditkit-chromium.log 2>&1; then
    exit 0
  fi
  echo "[auditkit setup] chromium did not install (see /tmp/auditkit-chromium.log); the browser test will be skipped"
  exit 0
fi
echo "[auditkit setup] chromium is not installed and this is not root with apt-get; the browser test will be skipped"
