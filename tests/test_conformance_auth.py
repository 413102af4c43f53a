"""The MCP conformance suite's client authorization scenarios, with mcpx as the client: the real mcpxd, mcpxctl
login through the scripted browser, and an SDK agent through the real mcpx-shim (tests/conformance/client.py).

Every `auth/` client scenario of the pinned suite must pass, except those in tests/conformance/expected-failures.toml,
which must fail (each has its reason there). The suite and Node.js 22 are installed on first use with `npm ci` into
.cache/conformance/ (see tests/conformance/suite.py); without npm the test fails and says so.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conformance import suite


@pytest.mark.timeout(suite.LOCK_TIMEOUT + suite.INSTALL_TIMEOUT + 600)
async def test_auth_scenarios(tmp_path: Path) -> None:
    try:
        installed = suite.install()
        scenarios = await suite.client_scenarios(installed)
    except suite.SuiteUnavailable as exc:
        pytest.fail(f"the MCP conformance suite is unavailable: {exc}")
    assert scenarios, f"conformance {installed.version} lists no auth/ client scenarios"
    expected = suite.expected_failures()
    assert all(expected.values()), "every expected failure needs its reason"
    unknown = sorted(set(expected) - set(scenarios))
    assert not unknown, f"expected-failures.toml lists scenarios the suite does not have: {unknown}"

    results = await suite.run_scenarios(installed, scenarios, tmp_path)

    report = [f"conformance {installed.version}, {len(results)} auth scenarios (results in {tmp_path}):"]
    wrong = []
    for result in results:
        listed = result.scenario in expected
        verdict = "pass" if result.passed else ("expected failure" if listed else "FAIL")
        report.append(f"  {verdict:16} {result.scenario}")
        if result.passed == listed:
            wrong.append(result)
    for result in wrong:
        if result.passed:
            report.append(f"\n{result.scenario} passes now: remove it from expected-failures.toml")
            continue
        report.append(f"\n{result.scenario} failed (suite exit {result.exit_code}):")
        report += [f"  {problem}" for problem in result.problems()]
        client_log = result.client_stderr.strip().splitlines()[-40:] or result.runner_output.splitlines()[-40:]
        report += ["  client stderr (last lines):", *(f"    {line}" for line in client_log)]
    print("\n".join(report))
    assert not wrong, "\n".join(report)
