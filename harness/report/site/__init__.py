"""The static HTML leaderboard site: :func:`harness.report.site.writer.write_site` writes it.

Modules: ``writer`` (the site's files, one page per record, figures), ``sections`` (a model's
table, filters and regression verdicts), ``record_page`` (one record's page), ``markup`` (escaping
and page scaffolding shared by both kinds of page), ``assets`` (the stylesheet and script written
beside the pages).
"""
