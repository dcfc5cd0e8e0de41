"""The demo, the HTML report and the `gradstats` command (issue 6).

`gradstats demo --quick` runs once for the module; the report it writes is parsed with BeautifulSoup and its
numbers are compared with the runs it saved (loaded back with `fastai_gradstats.load`) and, where they can
be, with values recomputed here from those runs' tables.
"""
import base64
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from bs4 import BeautifulSoup

from fastai_gradstats import Thresholds, cli, load, overview, run_figures, write_report
from fastai_gradstats.demo import COMPARISONS, EXPERIMENTS, vision_unavailable

RAN = [e for e in EXPERIMENTS if e.unavailable() is None]          # the vision runs need a torchvision that imports
COMPARED = [c for c in COMPARISONS if all(n in {e.name for e in RAN} for n in c)]
from fastai_gradstats.health import CHECKS

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
SECTIONS = ('heatmap', 'magnitude_hist', 'gradient_flow')
STATUS_RANK = {'critical': 0, 'warning': 1, 'ok': 2}


def gradstats(*args, cwd=None):
    return subprocess.run([sys.executable, '-m', 'fastai_gradstats', *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp('demo')/'out'
    proc = gradstats('demo', '--quick', '--out', out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.fixture(scope='module')
def runs(demo):
    out, _ = demo
    return {e.name: load(out/e.name) for e in RAN}


@pytest.fixture(scope='module')
def soup(demo):
    out, _ = demo
    return BeautifulSoup((out/'report.html').read_text(encoding='utf-8'), 'html.parser')


def section(soup, h2_id):
    "The elements after <h2 id=...> up to the next <h2>."
    start = soup.find('h2', id=h2_id)
    assert start is not None, h2_id
    out = []
    for el in start.find_next_siblings():
        if el.name == 'h2': break
        out.append(el)
    return out


def run_part(soup, name):
    "The elements inside a run's folded section, `<details id=run-name>`, after its `<summary>`."
    details = soup.find('details', id=f'run-{name}')
    assert details is not None, name
    return [el for el in details.children if getattr(el, 'name', None) and el.name != 'summary']


def comparison_labels(soup):
    "The runs each folded comparison draws, as its summary names them ('a vs b', without its metric)."
    folded = soup.find('h2', id='comparisons').find_next_siblings('details', class_='comparison')
    return [d.find('summary').get_text().rsplit(' (', 1)[0] for d in folded]


def parse_table(table):
    head = [th.get_text() for th in table.find('thead').find_all('th')]
    body = [[td.get_text() for td in tr.find_all('td')] for tr in table.find('tbody').find_all('tr')]
    classes = [tr.get('class', [None])[0] for tr in table.find('tbody').find_all('tr')]
    return pd.DataFrame(body, columns=head), classes


def num(text):
    return float('nan') if text == 'nan' else float(text)


def close(a, b, rtol=1e-5):
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rtol, abs_tol=0)


def worst(table, check):
    return min(table.loc[table['check'] == check, 'status'], key=STATUS_RANK.get)


def total_norms(record):
    "Total gradient norm per step, recomputed from the per-layer rows."
    df = record.df
    sq = (df['grad_norm'].to_numpy(np.float64)) ** 2
    return pd.Series(sq).groupby(df['step'].to_numpy()).sum().pow(0.5).to_numpy()


def check_self_contained(html):
    assert 'src="http' not in html and "src='http" not in html
    assert '<script' not in html.lower()
    assert '<link' not in html.lower()        # no external stylesheet
    soup = BeautifulSoup(html, 'html.parser')
    images = soup.find_all('img')
    assert images
    for img in images:
        src = img['src']
        assert src.startswith('data:image/png;base64,')
        assert base64.b64decode(src.split(',', 1)[1])[:8] == PNG_MAGIC
    return soup


# --- the demo --------------------------------------------------------------------------------
def test_demo_saves_every_run_figures_and_report(demo):
    out, _ = demo
    for e in RAN:
        assert {'meta.json', 'steps.parquet', 'stats.parquet'} <= {p.name for p in (out/e.name).iterdir()}
        for s in SECTIONS:
            assert (out/'figures'/f'{e.name}_{s}.png').read_bytes()[:8] == PNG_MAGIC
    for a, b in COMPARED:
        assert (out/'figures'/f'compare_{a}_vs_{b}.png').read_bytes()[:8] == PNG_MAGIC
    assert (out/'report.html').is_file()


def test_demo_prints_each_runs_summary(demo, runs):
    _, proc = demo
    for name, record in runs.items():
        assert f'== {name}' in proc.stdout
        assert record.summary() in proc.stdout
    assert 'Traceback' not in proc.stderr


def test_saved_runs_have_the_demo_step_counts(runs):
    """The digits demo trains 1500 images (320 for a vision model) in batches of 64 (the last, partial one dropped)
    for `quick_epochs` epochs."""
    for e in RAN:
        record = runs[e.name]
        assert len(record.steps) == (e.quick_n_train // 64) * e.quick_epochs, e.name
        assert list(record.steps['step']) == list(range(len(record.steps)))
        assert record.args['experiment'] == e.name and record.args['claim'] == e.claim


def test_demo_says_which_runs_it_skipped_and_why(demo, soup):
    "Where torchvision does not import, the resnet18 runs are skipped, with the reason in the console and the report."
    out, proc = demo
    skipped = [e for e in EXPERIMENTS if e not in RAN]
    assert all(e.arch is not None for e in skipped)
    if not skipped:
        assert soup.find('h2', id='skipped') is None and 'skipped' not in proc.stdout
        return
    reason = vision_unavailable()
    assert reason is not None and 'torchvision' in reason
    for e in skipped:
        assert f'== {e.name}' in proc.stdout and not (out/e.name).exists()
        assert f'skipped: {reason}' in proc.stdout
    items = section(soup, 'skipped')[0].find_all('li')
    assert [li.find('b').get_text() for li in items] == [e.name for e in skipped]
    assert all(reason in li.get_text() for li in items)


def test_report_is_self_contained(demo):
    out, _ = demo
    check_self_contained((out/'report.html').read_text(encoding='utf-8'))


def test_report_overview_numbers_come_from_the_saved_runs(soup, runs):
    overview = section(soup, 'overview')
    table, _ = parse_table(next(el for el in overview if el.name == 'table'))
    assert list(table['run']) == [e.name for e in RAN]
    for _, row in table.iterrows():
        record = runs[row['run']]
        steps = record.steps
        assert int(row['steps']) == len(steps)
        assert close(num(row['first_loss']), float(steps['loss'].iloc[0]))
        assert close(num(row['last_loss']), float(steps['loss'].iloc[-1]))
        norms = total_norms(record)
        finite = norms[np.isfinite(norms)]
        assert close(num(row['peak_grad_norm']), finite.max() if len(finite) else float('nan'), rtol=1e-4)
        health = record.health()
        assert int(row['critical']) == (health['status'] == 'critical').sum()
        assert int(row['warning']) == (health['status'] == 'warning').sum()


def test_report_has_every_section_per_run(soup, runs):
    """Each run is folded (<details>) under its readable title, with its verdict and, for a problem, its worst check's
    name; inside: claim, Summary, Health, then the figures under titles a reader understands."""
    for e in RAN:
        details = soup.find('details', id=f'run-{e.name}')
        heading = details.find('summary')
        verdict = runs[e.name].verdict()
        assert heading.find('span', class_='status').get_text() == verdict['status']
        assert e.title in heading.get_text() and f'({e.name})' in heading.get_text()
        if verdict['status'] != 'healthy': assert verdict['line'].split()[1].rstrip(':') in heading.find('span', class_='why').get_text()
        part = run_part(soup, e.name)
        headings = [el.get_text() for el in part if el.name == 'h4']
        assert headings == ['Summary', 'Health', 'Gradient norm per layer and step', 'Gradient magnitudes (log10 |g|) per step',
                            'Gradient flow from input to output']
        claim = [el for el in part if el.name == 'p' and 'claim' in el.get('class', [])]
        assert len(claim) == 1 and e.claim in claim[0].get_text()
        pre = [el for el in part if el.name == 'pre']
        assert len(pre) == 1 and pre[0].get_text() == runs[e.name].summary()
        images = [el for el in part if el.name == 'img']
        assert [img['class'][1] for img in images] == list(SECTIONS)


def test_report_images_are_the_saved_figures(soup, demo):
    out, _ = demo
    for e in RAN:
        for img in (el for el in run_part(soup, e.name) if el.name == 'img'):
            data = base64.b64decode(img['src'].split(',', 1)[1])
            assert data == (out/'figures'/f"{e.name}_{img['class'][1]}.png").read_bytes()


def test_report_health_tables_come_from_the_saved_runs(soup, runs):
    for e in RAN:
        table_el = next(el for el in run_part(soup, e.name) if el.name == 'table')
        table, classes = parse_table(table_el)
        health = runs[e.name].health()
        assert list(table['check']) == list(health['check'])
        assert list(table['layer']) == list(health['layer'])
        assert list(table['status']) == list(health['status']) == classes
        assert list(table['reason']) == list(health['reason'])
        for a, b in zip(table['value'], health['value']): assert close(num(a), float(b), rtol=1e-5)


def test_report_comparisons(soup, demo):
    out, _ = demo
    folded = soup.find('h2', id='comparisons').find_next_siblings('details')
    assert [d.find('summary').get_text() for d in folded] == [f'{a} vs {b} ({c.metric})' for c in COMPARED for a, b in [c]]
    images = [d.find('img') for d in folded]
    assert len(images) == len(COMPARED) and all('compare' in img['class'] for img in images)
    for (a, b), img in zip(COMPARED, images):
        assert base64.b64decode(img['src'].split(',', 1)[1]) == (out/'figures'/f'compare_{a}_vs_{b}.png').read_bytes()
    nav = [a['href'] for a in soup.find('nav').find_all('a')]
    assert nav == ['#questions', '#overview', '#runs', '#comparisons']


# --- the report opens with the threads' questions, answered ------------------------------------------------------------
def test_the_report_opens_with_one_section_per_question_with_its_verdict_numbers_and_figure(soup, runs, demo):
    """The questions come first (before the overview), one per source whose runs ran, each with its source, the claim,
    a verdict among confirmed / partly confirmed / not confirmed, its numbers and its figure (the file it saved)."""
    from fastai_gradstats.demo import SOURCES
    from fastai_gradstats.questions import QUESTIONS, VERDICTS
    out, _ = demo
    h2 = [h.get('id') for h in soup.find_all('h2')]
    assert h2.index('questions') < h2.index('overview') < h2.index('runs')
    sections = soup.find_all('section', class_='question')
    ran = [q for q in QUESTIONS if all(r in runs for r in q.runs)]
    assert [s['id'] for s in sections] == [f'question-{q.source}' for q in ran] and len(ran) == 5
    for section, q in zip(sections, ran):
        assert section.find('h3').get_text() == q.question
        assert SOURCES[q.source] in section.find('p', class_='source').get_text()
        assert q.claim in section.find('p', class_='claim').get_text()
        verdict = section.find('span', class_='verdict').get_text()
        assert verdict in VERDICTS
        img = section.find('img')
        assert base64.b64decode(img['src'].split(',', 1)[1]) == (out/'figures'/f'question_{q.source}.png').read_bytes()
        assert [r.strip() for r in section.find('p', class_='runs').get_text()[len('Runs: '):].split('(')[0].split(',')] == list(q.runs)


def answers_of(soup):
    return {s['id'][len('question-'):]: (s.find('span', class_='verdict').get_text(), s.find('p', class_='answer').get_text())
            for s in soup.find_all('section', class_='question')}


def test_the_verdicts_follow_from_the_saved_runs(soup, runs):
    """Each verdict recomputed here from the saved runs' tables: gradients >= 1 are rare with a sensible learning rate
    (histograms) and 100x larger with one far too high; plain ReLU keeps more zeros and a higher loss; sigmoids lose
    4x+ per layer towards the input; the x3 recurrent weight's first gradient is 100x the x0.5's (the vanishing half
    cannot be seen in a summed gradient: partly); the textbook's 100 separates the sensible runs from the broken ones."""
    from fastai_gradstats.stats import HIST_BINS
    found = answers_of(soup)
    def share_ge_one(record):
        h = record.hist
        weight = h['numel'] / h[list(HIST_BINS)].sum(axis=1)
        above = [b for b in HIST_BINS[HIST_BINS.index('1e0'):] if b != 'nan']
        per_step = (h[above].sum(axis=1) * weight).groupby(h['step']).sum() / h['numel'].groupby(h['step']).sum()
        return per_step.mean()
    sensible, high = runs['lr_reasonable'], runs['lr_too_high']
    ok_000 = share_ge_one(sensible) < 1e-3 and np.nanmax(high.df['grad_max']) > 100 * sensible.df['grad_max'].max()
    assert found['000'][0] == ('confirmed' if ok_000 else 'not confirmed')
    assert f"{sensible.df['grad_max'].max():.3g}" in found['000'][1]
    plain, general = runs['relu_default_init'], runs['generalrelu_kaiming']
    ok_001 = plain.df['zero_frac'].mean() > 2 * general.df['zero_frac'].mean() and \
        general.steps['loss'].iloc[-5:].mean() < plain.steps['loss'].iloc[-5:].mean()
    assert found['001'][0] == ('confirmed' if ok_001 else 'not confirmed')
    ratio = depth_ratio(runs['sigmoid_deep'])
    assert found['002'][0] == ('confirmed' if ratio > 1e4 and ratio ** 0.1 >= 4 and depth_ratio(runs['relu_deep']) < 100
                               else 'not confirmed')
    first = lambda r: r.df[(r.df.step == 0) & (r.df.layer == 'rnn.weight_ih_l0')].grad_norm.item()
    assert found['003'][0] == ('partly confirmed' if first(runs['rnn_scale_above_1']) > 100 * first(runs['rnn_scale_below_1'])
                               else 'not confirmed')
    peaks = {n: np.nanmax(np.where(np.isfinite(total_norms(runs[n])), total_norms(runs[n]), np.nan))
             for n in ('lr_reasonable', 'generalrelu_kaiming', 'relu_deep', 'lr_too_high', 'rnn_scale_above_1')}
    sensible_ok = all(peaks[n] <= 100 for n in ('lr_reasonable', 'generalrelu_kaiming', 'relu_deep'))
    broken_over = all(peaks[n] > 100 for n in ('lr_too_high', 'rnn_scale_above_1'))
    assert found['004'][0] == ('confirmed' if sensible_ok and broken_over else 'partly confirmed' if broken_over else 'not confirmed')


# --- the experiments show what their threads claim ---------------------------------------------
@pytest.mark.parametrize('exp', [e for e in RAN if e.expect], ids=lambda e: e.name)
def test_expected_health_statuses(exp, runs, soup):
    health = runs[exp.name].health()
    table, _ = parse_table(next(el for el in run_part(soup, exp.name) if el.name == 'table'))
    for check, status in exp.expect.items():
        assert worst(health, check) == status, (exp.name, check)
        assert worst(table, check) == status, (exp.name, check)


def depth_ratio(record):
    "Median rms gradient of the output-most weight over that of the input-most weight."
    df, layers = record.df, record.layers.set_index('name')
    weights = sorted([n for n in layers.index if len(layers.loc[n, 'shape']) >= 2], key=lambda n: layers.loc[n, 'depth'])
    rms = {n: np.median(df.loc[df['layer'].astype(str) == n, 'grad_norm'].to_numpy(float) / math.sqrt(layers.loc[n, 'numel']))
           for n in (weights[0], weights[-1])}
    return rms[weights[-1]] / rms[weights[0]]


def test_vanishing_and_exploding_runs_are_flagged_and_healthy_ones_are_not(runs):
    # independent evidence from the saved tables, then the diagnosis
    assert depth_ratio(runs['sigmoid_deep']) > 100
    assert depth_ratio(runs['relu_deep']) < 10
    for name in ('lr_too_high', 'rnn_scale_above_1'):
        norms = total_norms(runs[name])
        assert (~np.isfinite(norms) | (norms > 100)).any(), name
    for name in ('lr_reasonable', 'relu_deep'):
        norms = total_norms(runs[name])
        assert np.isfinite(norms).all() and norms.max() <= 100, name
    assert worst(runs['sigmoid_deep'].health(), 'vanishing') == 'critical'
    assert worst(runs['relu_deep'].health(), 'vanishing') == 'ok'
    for name in ('lr_too_high', 'rnn_scale_above_1'):
        assert worst(runs[name].health(), 'exploding') == 'critical', name
    for name in ('lr_reasonable', 'relu_deep'):
        h = runs[name].health()
        assert worst(h, 'exploding') == 'ok' and worst(h, 'nonfinite') == 'ok', name


def test_exploding_rnn_is_not_called_converged_and_its_clip_advice_names_its_base(runs):
    """The x3 RNN: every total norm above critical, the loss far above chance (ln 10) though it fell from an
    exploded start. Its summary said both 'exploding' and 'converged', and advised the 95th percentile of the
    exploded norms as the 'healthy' ones."""
    record, t = runs['rnn_scale_above_1'], Thresholds()
    norms = total_norms(record)
    assert (norms > t.total_norm_critical).all()
    assert record.steps['loss'].iloc[-5:].min() > 10 * math.log(10)
    text = record.summary()
    assert 'exploding' in text and 'converged:' not in text and 'mean convergence' not in text
    advice, = [l for l in text.splitlines() if l.strip().startswith('advice:')]
    assert f"GradientClip(max_norm={t.total_norm_warning:g})" in advice and 'total_norm_warning' in advice
    assert 'healthy total norms' not in advice
    assert f"clipped {int((norms > t.total_norm_warning).sum())} of {len(norms)} steps" in advice


def test_rnn_below_1_claims_what_its_run_measures(runs):
    """The x0.5 RNN claimed 'gradients vanish through time' while its health table said 'no vanishing'. GradStats
    sees one gradient per weight, summed over the time steps: small, far below the x3 run's, but not vanishing."""
    t = Thresholds()
    below, above = total_norms(runs['rnn_scale_below_1']), total_norms(runs['rnn_scale_above_1'])
    assert np.isfinite(below).all() and below.min() > t.vanishing_norm and below.max() <= t.total_norm_warning
    assert below.max() * 100 < above.min()
    exp = next(e for e in RAN if e.name == 'rnn_scale_below_1')
    assert 'over 100x below the norm-3 run' in exp.claim and 'does not vanish' in exp.claim
    # measured: test_expected_health_statuses holds the run and its report to these
    assert {'vanishing': 'ok', 'total_norm': 'ok', 'exploding': 'ok'}.items() <= exp.expect.items()
    assert worst(runs['rnn_scale_below_1'].health(), 'vanishing') == 'ok'


# --- gradstats report / summary on saved runs ------------------------------------------------
def test_report_command_on_saved_runs(demo, runs, tmp_path):
    out, _ = demo
    target = tmp_path/'sub'/'f.html'
    proc = gradstats('report', out/'sigmoid_deep', out/'relu_deep', '--out', target)
    assert proc.returncode == 0, proc.stderr
    assert str(target) in proc.stdout
    soup = check_self_contained(target.read_text(encoding='utf-8'))
    table, _ = parse_table(next(el for el in section(soup, 'overview') if el.name == 'table'))
    assert list(table['run']) == ['sigmoid_deep', 'relu_deep']
    for _, row in table.iterrows():
        assert int(row['steps']) == len(runs[row['run']].steps)
        assert close(num(row['last_loss']), float(runs[row['run']].steps['loss'].iloc[-1]))
    for name in ('sigmoid_deep', 'relu_deep'):
        part = run_part(soup, name)
        assert [img['class'][1] for img in part if img.name == 'img'] == list(SECTIONS)
        assert next(el for el in part if el.name == 'pre').get_text() == runs[name].summary()
    compare = [d.find('img') for d in soup.find('h2', id='comparisons').find_next_siblings('details')]
    assert len(compare) == 1
    assert comparison_labels(soup) == ['sigmoid_deep vs relu_deep']


def test_report_command_with_one_run_and_same_names(demo, tmp_path):
    out, _ = demo
    other = tmp_path/'elsewhere'/'lr_reasonable'
    shutil.copytree(out/'lr_reasonable', other)
    target = tmp_path/'two.html'
    assert cli.main(['report', str(out/'lr_reasonable'), str(other), '--out', str(target)]) == 0
    soup = check_self_contained(target.read_text(encoding='utf-8'))
    runs = list(parse_table(next(el for el in section(soup, 'overview') if el.name == 'table'))[0]['run'])
    assert len(runs) == 2 and len(set(runs)) == 2 and runs[0] == 'lr_reasonable'
    target = tmp_path/'one.html'
    assert cli.main(['report', str(out/'lr_reasonable'), '--out', str(target)]) == 0
    soup = check_self_contained(target.read_text(encoding='utf-8'))
    assert soup.find('h2', id='comparisons') is None


def test_summary_command(demo, runs):
    out, _ = demo
    proc = gradstats('summary', out/'lr_too_high')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == runs['lr_too_high'].summary() + '\n'
    assert f"over {len(runs['lr_too_high'].steps)} recorded step(s)" in proc.stdout
    assert 'CRITICAL' in proc.stdout and 'exploding' in proc.stdout


def test_summary_command_all(demo, runs, capsys):
    out, _ = demo
    assert cli.main(['summary', str(out/'relu_deep'), '--all']) == 0
    text = capsys.readouterr().out
    assert text == runs['relu_deep'].summary(show_ok=True) + '\n'
    for check in CHECKS:
        assert check in text


# --- bad input: one line on stderr, exit code 2, no traceback --------------------------------
def assert_clean_error(proc, command):
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f'gradstats {command}: error:')
    assert 'Traceback' not in proc.stderr
    return lines[0]


def test_summary_of_a_missing_dir(tmp_path):
    missing = tmp_path/'no_such_run'
    line = assert_clean_error(gradstats('summary', missing), 'summary')
    assert 'no_such_run' in line


def test_report_with_a_corrupted_meta_json(demo, tmp_path):
    out, _ = demo
    run = tmp_path/'broken'
    shutil.copytree(out/'relu_deep', run)
    (run/'meta.json').write_text('{"format": "fastai_gradstats.record", "layers": [', encoding='utf-8')
    target = tmp_path/'r.html'
    line = assert_clean_error(gradstats('report', out/'sigmoid_deep', run, '--out', target), 'report')
    assert 'meta.json' in line
    assert not target.exists()


def corrupt(run, how):
    if how == 'garbage_meta': (run/'meta.json').write_bytes(b'\x00\xff not json')
    elif how == 'meta_is_a_list': (run/'meta.json').write_text('[1, 2, 3]')
    elif how == 'meta_without_layers':
        meta = json.loads((run/'meta.json').read_text()); del meta['layers']; (run/'meta.json').write_text(json.dumps(meta))
    elif how == 'meta_layers_lack_keys':
        meta = json.loads((run/'meta.json').read_text())
        meta['layers'] = [{'name': l['name']} for l in meta['layers']]; (run/'meta.json').write_text(json.dumps(meta))
    elif how == 'newer_format':
        meta = json.loads((run/'meta.json').read_text()); meta['format_version'] = 999; (run/'meta.json').write_text(json.dumps(meta))
    elif how == 'missing_stats': (run/'stats.parquet').unlink()
    elif how == 'garbage_parquet': (run/'stats.parquet').write_bytes(b'PAR1 this is not parquet')
    elif how == 'parquet_lacks_columns':
        pd.read_parquet(run/'stats.parquet')[['step', 'layer']].to_parquet(run/'stats.parquet', index=False)
    elif how == 'steps_lacks_columns':
        pd.read_parquet(run/'steps.parquet')[['step']].to_parquet(run/'steps.parquet', index=False)
    elif how == 'empty_dir':
        for p in run.iterdir(): p.unlink()
    elif how == 'is_a_file':
        shutil.rmtree(run); run.write_text('hello')


CORRUPTIONS = ['garbage_meta', 'meta_is_a_list', 'meta_without_layers', 'meta_layers_lack_keys', 'newer_format',
               'missing_stats', 'garbage_parquet', 'parquet_lacks_columns', 'steps_lacks_columns', 'empty_dir', 'is_a_file']


@pytest.mark.parametrize('how', CORRUPTIONS)
def test_unreadable_runs_give_a_one_line_error(demo, tmp_path, capsys, how):
    "In process: `main` returns 2 with one line on stderr; an exception escaping it would be a traceback."
    out, _ = demo
    run = tmp_path/'run'
    shutil.copytree(out/'lr_reasonable', run)
    corrupt(run, how)
    for argv, command in ((['summary', str(run)], 'summary'), (['report', str(run), '--out', str(tmp_path/'r.html')], 'report')):
        code = cli.main(argv)
        err = capsys.readouterr().err
        assert code == 2, (how, command)
        assert len(err.strip().splitlines()) == 1 and err.startswith(f'gradstats {command}: error:'), err


def test_demo_runs_are_reproducible():
    "`run_experiment` seeds torch, numpy and Python's random (fastai shuffles with it): two runs record the same numbers."
    from fastai_gradstats.demo import run_experiment
    exp = next(e for e in RAN if e.name == 'rnn_scale_above_1')
    a, b = (run_experiment(exp, quick=True, progress=False) for _ in range(2))
    pd.testing.assert_frame_equal(a.steps, b.steps)
    pd.testing.assert_frame_equal(a.df, b.df)
    # the explosion is not borderline: the first step's total norm is far above the critical threshold
    assert a.steps['grad_norm'].iloc[0] > 10 * Thresholds().total_norm_critical


def no_training(monkeypatch):
    "Make `run_demo` fail loudly if it trains anything: its argument checks must come first."
    from fastai_gradstats import demo as demo_module
    def trained(*args, **kwargs): raise AssertionError('run_demo trained before checking its `out`')
    monkeypatch.setattr(demo_module, 'run_experiment', trained)


def test_demo_refuses_an_empty_out(tmp_path, monkeypatch, capsys):
    "`--out ''` was Path('.'): everything written into the current directory with rc 0."
    from fastai_gradstats.demo import run_demo
    no_training(monkeypatch)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match='`out`'): run_demo('')
    assert cli.main(['demo', '--out', '', '--quick']) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith('gradstats demo: error:') and '`out`' in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('blocked', ['figures', 'report.html', 'rnn_scale_above_1', '.'])
def test_demo_checks_its_paths_before_training(tmp_path, monkeypatch, capsys, blocked):
    """A file where the demo needs a directory (figures, a run's folder, out itself), or a directory where report.html
    goes: refused before the first experiment trains (was after all of them), naming the path in the way."""
    from fastai_gradstats.demo import run_demo
    no_training(monkeypatch)
    out = tmp_path/'out'
    if blocked == 'report.html': (out/'report.html').mkdir(parents=True)
    elif blocked == '.': out.write_text('not a directory')
    else:
        out.mkdir()
        (out/blocked).write_text('not a directory')
    in_the_way = out if blocked == '.' else out/blocked
    with pytest.raises(ValueError, match='`out`') as info: run_demo(out, quick=True)
    assert str(in_the_way) in str(info.value)
    assert cli.main(['demo', '--out', str(out), '--quick']) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith('gradstats demo: error:') and str(in_the_way) in err


# --- the report and the command on small runs (no demo): names, file names, argument checks ---------------------
@pytest.fixture(scope='module')
def small_runs():
    "Three short fits of a tiny MLP on 32, 48 and 64 digits in batches of 16: 2, 3 and 4 recorded steps."
    import warnings
    from fastai.basics import SGD, CrossEntropyLossFlat, Learner
    from fastai_gradstats import GradStats
    from helpers import small_dls, tiny_mlp
    runs = []
    for n_train in (32, 48, 64):
        learn = Learner(small_dls(n_train=n_train), tiny_mlp(), loss_func=CrossEntropyLossFlat(), opt_func=SGD)
        with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            learn.fit(1, 1e-2, cbs=GradStats(hist=True))
        runs.append(learn.grad_stats)
    assert [len(r.steps) for r in runs] == [2, 3, 4]
    return runs


def overview_table(soup):
    return parse_table(next(el for el in section(soup, 'overview') if el.name == 'table'))[0]


def test_report_command_keeps_every_run_when_a_made_up_name_is_taken(small_runs, tmp_path):
    "`runA`, `sub/runA` and a directory called `runA (2)`: three runs in the report, none dropped."
    dirs = [tmp_path/'runA', tmp_path/'sub'/'runA', tmp_path/'runA (2)']
    for record, d in zip(small_runs, dirs): record.save(d)
    target = tmp_path/'r.html'
    assert cli.main(['report', *map(str, dirs), '--out', str(target)]) == 0
    soup = check_self_contained(target.read_text(encoding='utf-8'))
    table = overview_table(soup)
    names = list(table['run'])
    assert len(names) == 3 and len(set(names)) == 3
    assert names[0] == 'runA' and names[2] == 'runA (2)'       # a name free to take is the directory's own
    assert [int(s) for s in table['steps']] == [2, 3, 4]       # each run once, in the order given
    for name in names: assert run_part(soup, name)
    assert comparison_labels(soup) == [' vs '.join(names)]


def test_write_report_draws_each_comparison_of_two_or_more_runs(small_runs, tmp_path):
    records = dict(zip('abc', small_runs))
    soup = check_self_contained(write_report(records, tmp_path/'r.html', comparisons=[('a', 'b', 'c'), ['c', 'a']])
                                .read_text(encoding='utf-8'))
    assert comparison_labels(soup) == ['a vs b vs c', 'c vs a']
    soup = BeautifulSoup(write_report(records, tmp_path/'none.html', comparisons=[]).read_text(encoding='utf-8'),
                         'html.parser')
    assert soup.find('h2', id='comparisons') is None


EXPECTED_COMPARISONS = "`comparisons` must be a list of tuples of two or more run names"


@pytest.mark.parametrize('comparisons, error, message', [
    ([('a', 'bb')], ValueError, "`comparisons` names unknown run(s) ['bb']"),
    ([('a', 'b'), ('b', 'c', 'x')], ValueError, "`comparisons` names unknown run(s) ['x']"),
    (('a', 'b'), TypeError, EXPECTED_COMPARISONS),
    ([('a',)], ValueError, EXPECTED_COMPARISONS),
    ([()], ValueError, EXPECTED_COMPARISONS),
    (5, TypeError, EXPECTED_COMPARISONS),
    ('ab', TypeError, EXPECTED_COMPARISONS),
    ([('a', 1)], TypeError, EXPECTED_COMPARISONS),
], ids=['misspelled', 'misspelled_in_second', 'flat_tuple', 'one_run', 'empty_tuple', 'int', 'str', 'not_a_name'])
def test_write_report_rejects_bad_comparisons(small_runs, tmp_path, comparisons, error, message):
    target = tmp_path/'r.html'
    with pytest.raises(error) as info:
        write_report(dict(zip('abc', small_runs)), target, comparisons=comparisons)
    assert message in str(info.value)
    assert not target.exists()


def bad_calls(r, t):
    "(call, exception, the argument named in the message) for arguments of the wrong type or value."
    from fastai_gradstats import GradRecord
    return {
        'run_figures_record_str': (lambda: run_figures('x', 'a'), TypeError, '`record`'),
        'run_figures_record_empty': (lambda: run_figures(GradRecord(), 'a'), ValueError, '`record`'),
        'run_figures_name_int': (lambda: run_figures(r, 5), TypeError, '`name`'),
        'run_figures_figures_dir_int': (lambda: run_figures(r, 'a', 3), TypeError, '`figures_dir`'),
        'overview_list': (lambda: overview([r]), TypeError, '`records`'),
        'overview_empty_dict': (lambda: overview({}), ValueError, '`records`'),
        'overview_value_str': (lambda: overview({'a': 'x'}), TypeError, "`records['a']`"),
        'overview_empty_record': (lambda: overview({'a': GradRecord()}), ValueError, "`records['a']`"),
        'write_report_title_none': (lambda: write_report({'a': r}, t, title=None), TypeError, '`title`'),
        'write_report_int_key': (lambda: write_report({1: r}, t), TypeError, '`records`'),
        'write_report_empty_key': (lambda: write_report({'': r}, t), TypeError, '`records`'),
        'write_report_out_int': (lambda: write_report({'a': r}, 3), TypeError, '`out`'),
        'write_report_out_none': (lambda: write_report({'a': r}, None), TypeError, '`out`'),
        'write_report_figures_dir_int': (lambda: write_report({'a': r}, t, figures_dir=3), TypeError, '`figures_dir`'),
    }


@pytest.mark.parametrize('case', list(bad_calls(None, None)))
def test_bad_arguments_give_an_error_naming_the_argument(small_runs, tmp_path, case):
    call, error, argument = bad_calls(small_runs[0], tmp_path/'r.html')[case]
    with pytest.raises(error) as info: call()
    assert argument in str(info.value)
    assert not (tmp_path/'r.html').exists()


def test_overview_of_one_record_is_the_run_named_run(small_runs):
    r = small_runs[1]
    table = overview(r)
    assert list(table['run']) == ['run'] and list(table['steps']) == [3]
    assert table['first_loss'].iloc[0] == float(r.steps['loss'].iloc[0])
    pd.testing.assert_frame_equal(table, overview({'run': r}))


def test_run_figures_creates_its_folder(small_runs, tmp_path):
    folder = tmp_path/'new'/'figures'
    figures = run_figures(small_runs[0], 'a/b', folder)
    assert set(figures) == set(SECTIONS)
    assert sorted(p.name for p in folder.iterdir()) == sorted(f'a_b_{s}.png' for s in SECTIONS)
    for s, data in figures.items():
        png = base64.b64decode(data)
        assert png[:8] == PNG_MAGIC and (folder/f'a_b_{s}.png').read_bytes() == png


def test_figure_files_are_safe_and_one_per_figure(small_runs, tmp_path):
    """Names with path separators or other characters keep their display name; their files stay in `figures_dir`,
    and names that would share a file (`a/b`, `a_b`, `a?b`; comparisons `a_vs_b`+`c` and `a`+`b_vs_c`) do not."""
    a, b, c = small_runs
    records = {'a/b': a, 'a_b': b, 'a?b': c, '../up': a, 'a': a, 'b': b, 'c': c, 'a_vs_b': b, 'b_vs_c': c}
    comparisons = [('a/b', 'a_b'), ('a_vs_b', 'c'), ('a', 'b_vs_c'), ('a', 'b_vs_c')]
    folder = tmp_path/'figs'
    out = write_report(records, tmp_path/'r.html', comparisons=comparisons, figures_dir=folder)
    assert [p for p in tmp_path.rglob('*.png') if p.parent != folder] == []
    soup = check_self_contained(out.read_text(encoding='utf-8'))
    assert [d['id'][len('run-'):] for d in soup.find_all('details', class_='run')] == list(records)
    images = [base64.b64decode(img['src'].split(',', 1)[1]) for img in soup.find_all('img')]
    assert len(images) == len(records) * len(SECTIONS) + len(comparisons)
    files = sorted(folder.iterdir())
    assert len(files) == len(images)                       # no figure overwrote another's file
    on_disk = [p.read_bytes() for p in files]
    assert all(image in on_disk for image in images)
    assert (folder/'a_b_heatmap.png').is_file() and (folder/'compare_a_vs_b_vs_c.png').is_file()


def test_documented_commands_list_every_option():
    "README and the module docstring show each option of each command; `summary --all` with its --help text."
    readme = (Path(__file__).parent.parent/'README.md').read_text(encoding='utf-8')
    commands = cli._parser()._subparsers._group_actions[0].choices
    for name, parser in commands.items():
        for action in parser._actions:
            for flag in (f for f in action.option_strings if f.startswith('--') and f != '--help'):
                line = next(l for l in readme.splitlines() if l.startswith(f'gradstats {name} '))
                assert flag in line, (name, flag)
                doc = next(l for l in cli.__doc__.split('\n- ') if l.startswith(f'`gradstats {name} '))
                assert flag in doc, (name, flag)
    help_all = next(a.help for a in commands['summary']._actions if '--all' in a.option_strings)
    assert f'--all: {help_all}' in readme and f'`--all`: {help_all}' in cli.__doc__


def test_a_merge_of_ranks_is_refused_by_the_figures_and_summed_up_by_the_overview(small_runs, tmp_path):
    "A merge would draw its ranks over each other: the report asks for each rank's own record, and writes nothing."
    from fastai_gradstats import merge
    merged = merge(small_runs[:2])
    out = tmp_path/'report.html'
    with pytest.raises(ValueError, match=r"records\['both'\]` is a merge of several ranks"):
        write_report({'both': merged}, out)
    assert not out.exists()
    with pytest.raises(ValueError, match='merge of several ranks'): run_figures(merged, 'both')
    assert list(overview(merged)['steps']) == [len(small_runs[0].steps) + len(small_runs[1].steps)]
    write_report({'rank 0': small_runs[0], 'rank 1': small_runs[1]}, out)   # the ranks one by one
    assert out.exists()


# --- each comparison draws the metric of its claim ----------------------------------------------
def test_write_report_draws_the_metric_each_comparison_names(small_runs, tmp_path, monkeypatch):
    "A `Comparison` names its metric (drawn in its figure's titles); a plain tuple of names compares grad_rms."
    from fastai_gradstats import report
    drawn, original = [], report.compare
    def spy(records, metric='grad_rms', labels=None, weights_only=True):
        fig = original(records, metric, labels, weights_only)
        drawn.append((tuple(labels), metric, [ax.get_title() for ax in fig.axes]))
        return fig
    monkeypatch.setattr(report, 'compare', spy)
    records = dict(zip('abc', small_runs))
    entries = [report.Comparison(('a', 'b'), metric='zero_frac'), ('b', 'c')]
    soup = check_self_contained(write_report(records, tmp_path/'r.html', comparisons=entries).read_text(encoding='utf-8'))
    assert comparison_labels(soup) == ['a vs b', 'b vs c']
    assert [(names, metric) for names, metric, _ in drawn] == [(('a', 'b'), 'zero_frac'), (('b', 'c'), 'grad_rms')]
    assert all(metric in title for _, metric, titles in drawn for title in titles)
    with pytest.raises(ValueError, match=r"`comparisons`.*'no_such_metric'"):
        write_report(records, tmp_path/'bad.html', comparisons=[report.Comparison(('a', 'b'), metric='no_such_metric')])
    with pytest.raises(TypeError, match='`comparisons`'):
        write_report(records, tmp_path/'bad.html', comparisons=[report.Comparison(('a', 'b'), metric=3)])
    assert not (tmp_path/'bad.html').exists()


def test_demo_comparison_of_dead_units_shows_its_claim(runs):
    """'Kaiming-initialised GeneralReLU keeps more units alive': its pair compares the dead fraction, which is lower
    for GeneralReLU at every hidden layer; the other pairs compare gradient size. Every entry still unpacks as a pair."""
    from fastai_gradstats import compare_table
    metrics = {tuple(c): getattr(c, 'metric', 'grad_rms') for c in COMPARED}
    assert metrics[('relu_default_init', 'generalrelu_kaiming')] == 'dead_frac'
    assert {m for names, m in metrics.items() if names != ('relu_default_init', 'generalrelu_kaiming')} == {'grad_rms'}
    assert all(len(c) == 2 for c in COMPARED)
    table = compare_table([runs['relu_default_init'], runs['generalrelu_kaiming']], 'dead_frac', labels=['relu', 'general'])
    hidden = table.iloc[:-1]   # the output layer's units have no ReLU after them
    assert (hidden[('general', 'median')] < hidden[('relu', 'median')]).all()
    assert hidden[('relu', 'median')].mean() > 0.1


# --- the report in a browser -----------------------------------------------------------------------------------------
CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (apt-get install chromium)")
def test_the_report_renders_in_headless_chromium_without_console_errors(demo, tmp_path):
    """The demo's report opened in headless Chromium at 1280 px: a screenshot of that width is written, the page logs
    no console message (it has no script, so nothing may fail), and the DOM Chromium built holds every section."""
    out, _ = demo
    flags = [CHROMIUM, '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
             '--disable-component-update', '--disable-sync', '--no-first-run', f'--user-data-dir={tmp_path/"profile"}',
             '--enable-logging=stderr', '--v=0']
    shot = tmp_path/'report.png'
    url = (out/'report.html').resolve().as_uri()
    proc = subprocess.run([*flags, f'--screenshot={shot}', '--window-size=1280,2400', url], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from PIL import Image
    assert Image.open(shot).size == (1280, 2400)
    console = [l for l in proc.stderr.splitlines() if 'CONSOLE' in l]
    assert not console, console
    dom = subprocess.run([*flags, '--dump-dom', url], capture_output=True, text=True, timeout=120).stdout
    soup = BeautifulSoup(dom, 'html.parser')
    assert soup.find('h2', id='questions') and len(soup.find_all('section', class_='question')) == 5
    assert len(soup.find_all('details', class_='run')) == len(RAN)
    assert not any(d.has_attr('open') for d in soup.find_all('details'))   # folded until opened
