"""Renders result objects, computes nothing: shared wording (`words`), the terminal (`terminal`), JSON
(`json`) and the HTML picture (`html`).
"""
