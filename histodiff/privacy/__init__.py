"""Differential privacy at a site: DP-SGD local steps (opacus), a persistent per-site accountant, the privacy report."""

from histodiff.privacy.accountant import ACCOUNTANT_FILE, PrivacyBudgetExhausted, SiteAccountant

__all__ = ["ACCOUNTANT_FILE", "PrivacyBudgetExhausted", "SiteAccountant"]
