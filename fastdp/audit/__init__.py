"""Empirical privacy audits: ``audit`` (one training run with canaries, Steinke, Nasr and Jagielski 2023) and
``multi_run_audit`` (Clopper-Pearson over many runs). ``fastdp audit`` is the command line over ``audit``.

Modules: ``one_run`` (the one-run bound), ``multi_run`` (Clopper-Pearson), ``canaries`` (white-box Dirac gradient
canaries inserted into the optimizer's clipped sum), ``training`` (the audited runs), ``report``, ``cli``.

``fastdp.audit`` (the attribute of the top-level package) is the function; import the modules by their full names
(``from fastdp.audit.one_run import eps_lower_bound``).
"""
from fastdp.audit.api import THREATS, AuditResult, audit, multi_run_audit

__all__ = ["THREATS", "AuditResult", "audit", "multi_run_audit"]
