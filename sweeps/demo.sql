-- What `make demo` prints after its sweep: one row per model and recipe, accuracy per task (20 questions each:
-- standard errors of about 0.1, in `qsweep sql "SELECT * FROM latest_metrics"`), KL and perplexity against the base.
SELECT model, recipe,
       round(max(value) FILTER (WHERE metric = 'bits_per_weight'), 2) AS bpw,
       round(max(value) FILTER (WHERE metric = 'disk_bytes') / 1e6, 1) AS mb,
       round(max(value) FILTER (WHERE task = 'arc_challenge' AND metric = 'acc'), 2) AS arc_c,
       round(max(value) FILTER (WHERE task = 'arc_easy' AND metric = 'acc'), 2) AS arc_e,
       round(max(value) FILTER (WHERE task = 'boolq' AND metric = 'acc'), 2) AS boolq,
       round(max(value) FILTER (WHERE task = 'hellaswag' AND metric = 'acc'), 2) AS hswag,
       round(max(value) FILTER (WHERE task = 'openbookqa' AND metric = 'acc'), 2) AS obqa,
       round(max(value) FILTER (WHERE task = 'piqa' AND metric = 'acc'), 2) AS piqa,
       round(max(value) FILTER (WHERE task = 'winogrande' AND metric = 'acc'), 2) AS wino,
       round(max(value) FILTER (WHERE metric = 'kl_mean'), 4) AS kl_mean,
       round(max(value) FILTER (WHERE metric = 'ppl_ratio'), 3) AS ppl_ratio
FROM latest_metrics
WHERE stage IN ('quantize', 'benchmark', 'fidelity')
GROUP BY model, recipe
ORDER BY model, bpw DESC
