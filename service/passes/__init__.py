"""The passes that call provisioners: the only part of ``service/`` that imports ``provisioners``.

Each pass claims its work through a domain function (one transaction), calls the
provisioner outside any transaction, and records the outcome through another
domain function. A pass is a plain function of ``(rt, now)``; the scheduler
(``service.scheduler``) only decides how often each one runs.
"""
