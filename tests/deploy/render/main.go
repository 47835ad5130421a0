// Command render renders a Helm chart the way `helm template` does, offline,
// with the same engine Helm uses: Go's text/template, the sprig v3 function
// map (minus env/expandenv, as Helm) and Helm's own functions (include, tpl,
// required, toYaml, fromYaml, toJson, fromJson, lookup). Built in GOPATH mode
// from Debian's golang-* packages only, because the Helm CLI is not
// installable here.
//
//	render --chart helm/kvr [-f extra.yaml ...] [--set-string-free] --out DIR
//	       [--release NAME] [--namespace NS] [--api-versions a/v1,b/v2]
//	       [--kube-version 1.29.0]
//
// Writes one file per rendered template under DIR (same relative paths as
// Helm: <chart>/templates/<file>), NOTES.txt included, and the merged values
// as DIR/values.json. Exit 1 with the template error on stderr when a
// template fails (e.g. a `required` value is missing).
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"text/template"

	"github.com/Masterminds/sprig"
	yaml "gopkg.in/yaml.v2"
)

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

// VersionSet mirrors Helm's chartutil.VersionSet (.Capabilities.APIVersions).
type VersionSet []string

// Has reports whether apiVersion (e.g. "monitoring.coreos.com/v1", or
// "monitoring.coreos.com/v1/ServiceMonitor") is available.
func (v VersionSet) Has(apiVersion string) bool {
	for _, x := range v {
		if x == apiVersion {
			return true
		}
	}
	return false
}

// KubeVersion mirrors Helm's chartutil.KubeVersion.
type KubeVersion struct {
	Version string
	Major   string
	Minor   string
}

func (k KubeVersion) String() string    { return k.Version }
func (k KubeVersion) GitVersion() string { return k.Version }

// Files mirrors Helm's .Files for files inside the chart (templates/ and
// values excluded, as Helm does).
type Files map[string][]byte

func (f Files) Get(name string) string     { return string(f[name]) }
func (f Files) GetBytes(name string) []byte { return f[name] }

// Glob returns the files matching pattern (path.Match syntax).
func (f Files) Glob(pattern string) Files {
	out := Files{}
	for n, b := range f {
		if ok, _ := path.Match(pattern, n); ok {
			out[n] = b
		}
	}
	return out
}

// toStringKeys turns yaml.v2's map[interface{}]interface{} into the
// map[string]interface{} Helm works with.
func toStringKeys(v interface{}) interface{} {
	switch t := v.(type) {
	case map[interface{}]interface{}:
		m := make(map[string]interface{}, len(t))
		for k, x := range t {
			m[fmt.Sprint(k)] = toStringKeys(x)
		}
		return m
	case []interface{}:
		for i := range t {
			t[i] = toStringKeys(t[i])
		}
		return t
	default:
		return v
	}
}

// yamlToHelm parses YAML the way Helm does (sigs.k8s.io/yaml: YAML -> JSON ->
// encoding/json), so numbers become float64 exactly as in Helm.
func yamlToHelm(data []byte) (map[string]interface{}, error) {
	var raw interface{}
	if err := yaml.Unmarshal(data, &raw); err != nil {
		return nil, err
	}
	if raw == nil {
		return map[string]interface{}{}, nil
	}
	j, err := json.Marshal(toStringKeys(raw))
	if err != nil {
		return nil, err
	}
	out := map[string]interface{}{}
	if err := json.Unmarshal(j, &out); err != nil {
		return nil, fmt.Errorf("values must be a map: %v", err)
	}
	return out, nil
}

// toYAML is Helm's toYaml: JSON first (so float64 integers print as
// integers), then YAML with sorted keys, trailing newline trimmed.
func toYAML(v interface{}) string {
	j, err := json.Marshal(v)
	if err != nil {
		return ""
	}
	var y interface{}
	if err := yaml.Unmarshal(j, &y); err != nil {
		return ""
	}
	b, err := yaml.Marshal(y)
	if err != nil {
		return ""
	}
	return strings.TrimSuffix(string(b), "\n")
}

func fromYAML(s string) map[string]interface{} {
	m, err := yamlToHelm([]byte(s))
	if err != nil {
		return map[string]interface{}{"Error": err.Error()}
	}
	return m
}

func toJSON(v interface{}) string {
	b, err := json.Marshal(v)
	if err != nil {
		return ""
	}
	return string(b)
}

func fromJSON(s string) map[string]interface{} {
	m := map[string]interface{}{}
	if err := json.Unmarshal([]byte(s), &m); err != nil {
		m["Error"] = err.Error()
	}
	return m
}

// mergeValues overlays src onto dst like Helm's coalescing of -f files: maps
// merge recursively, anything else replaces; a null in src deletes the key.
func mergeValues(dst, src map[string]interface{}) {
	for k, v := range src {
		if v == nil {
			delete(dst, k)
			continue
		}
		sm, sok := v.(map[string]interface{})
		dm, dok := dst[k].(map[string]interface{})
		if sok && dok {
			mergeValues(dm, sm)
			continue
		}
		dst[k] = v
	}
}

func main() {
	chartDir := flag.String("chart", "", "chart directory (holds Chart.yaml)")
	outDir := flag.String("out", "", "directory to write the rendered files to")
	release := flag.String("release", "kvr", "release name")
	namespace := flag.String("namespace", "default", "release namespace")
	apiVersions := flag.String("api-versions", "", "comma-separated extra API versions for .Capabilities.APIVersions.Has")
	kubeVersion := flag.String("kube-version", "1.29.0", "Kubernetes version for .Capabilities.KubeVersion")
	var valueFiles multiFlag
	flag.Var(&valueFiles, "f", "values file overlaid on values.yaml (repeatable, later wins)")
	flag.Parse()
	if *chartDir == "" || *outDir == "" {
		fmt.Fprintln(os.Stderr, "render: --chart and --out are required")
		os.Exit(2)
	}
	if err := run(*chartDir, *outDir, *release, *namespace, *apiVersions, *kubeVersion, valueFiles); err != nil {
		fmt.Fprintln(os.Stderr, "render:", err)
		os.Exit(1)
	}
}

func run(chartDir, outDir, release, namespace, apiVersions, kubeVersion string, valueFiles []string) error {
	chartYAML, err := os.ReadFile(filepath.Join(chartDir, "Chart.yaml"))
	if err != nil {
		return err
	}
	chartMeta, err := yamlToHelm(chartYAML)
	if err != nil {
		return fmt.Errorf("Chart.yaml: %v", err)
	}
	chartName, _ := chartMeta["name"].(string)
	if chartName == "" {
		return errors.New("Chart.yaml: name is required")
	}
	// .Chart uses Helm's capitalised field names.
	chart := map[string]interface{}{}
	for k, v := range chartMeta {
		chart[strings.ToUpper(k[:1])+k[1:]] = v
	}

	values := map[string]interface{}{}
	if b, err := os.ReadFile(filepath.Join(chartDir, "values.yaml")); err == nil {
		if values, err = yamlToHelm(b); err != nil {
			return fmt.Errorf("values.yaml: %v", err)
		}
	}
	for _, f := range valueFiles {
		b, err := os.ReadFile(f)
		if err != nil {
			return err
		}
		extra, err := yamlToHelm(b)
		if err != nil {
			return fmt.Errorf("%s: %v", f, err)
		}
		mergeValues(values, extra)
	}

	// Chart files: everything but templates/, values*.yaml and Chart.yaml.
	files := Files{}
	templates := map[string]string{}
	err = filepath.Walk(chartDir, func(p string, info os.FileInfo, err error) error {
		if err != nil || info.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(chartDir, p)
		rel = filepath.ToSlash(rel)
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if strings.HasPrefix(rel, "templates/") {
			templates[path.Join(chartName, rel)] = string(b)
		} else if rel != "Chart.yaml" && rel != "values.yaml" && rel != "values.schema.json" {
			files[rel] = b
		}
		return nil
	})
	if err != nil {
		return err
	}

	var versions VersionSet = []string{"v1", "apps/v1", "policy/v1", "autoscaling/v2",
		"networking.k8s.io/v1", "batch/v1"}
	for _, v := range strings.Split(apiVersions, ",") {
		if v = strings.TrimSpace(v); v != "" {
			versions = append(versions, v)
		}
	}
	parts := strings.SplitN(strings.TrimPrefix(kubeVersion, "v"), ".", 3)
	if len(parts) < 2 {
		return fmt.Errorf("--kube-version %q: want MAJOR.MINOR[.PATCH]", kubeVersion)
	}
	top := map[string]interface{}{
		"Values": values,
		"Chart":  chart,
		"Release": map[string]interface{}{
			"Name": release, "Namespace": namespace, "Service": "Helm",
			"IsInstall": true, "IsUpgrade": false, "Revision": 1,
		},
		"Capabilities": map[string]interface{}{
			"APIVersions": versions,
			"KubeVersion": KubeVersion{Version: "v" + strings.TrimPrefix(kubeVersion, "v"), Major: parts[0], Minor: parts[1]},
		},
		"Files": files,
	}

	// One template set holding every file, like Helm's engine, so defines
	// from any file (the _*.tpl partials) are visible everywhere.
	root := template.New("gotpl")
	root.Option("missingkey=zero")
	includedNames := map[string]int{}
	funcs := sprig.TxtFuncMap()
	delete(funcs, "env")
	delete(funcs, "expandenv")
	funcs["toYaml"] = toYAML
	funcs["fromYaml"] = fromYAML
	funcs["toJson"] = toJSON
	funcs["fromJson"] = fromJSON
	funcs["required"] = func(msg string, v interface{}) (interface{}, error) {
		if v == nil {
			return v, errors.New(msg)
		}
		if s, ok := v.(string); ok && s == "" {
			return v, errors.New(msg)
		}
		return v, nil
	}
	funcs["lookup"] = func(apiVersion, kind, ns, name string) (map[string]interface{}, error) {
		return map[string]interface{}{}, nil // helm template: no cluster
	}
	funcs["include"] = func(name string, data interface{}) (string, error) {
		if includedNames[name] > 1000 {
			return "", fmt.Errorf("rendering template has a nested reference name: %s", name)
		}
		includedNames[name]++
		defer func() { includedNames[name]-- }()
		var buf bytes.Buffer
		if err := root.ExecuteTemplate(&buf, name, data); err != nil {
			return "", err
		}
		return buf.String(), nil
	}
	funcs["tpl"] = func(text string, data interface{}) (string, error) {
		t, err := root.Clone()
		if err != nil {
			return "", err
		}
		t, err = t.New("tpl").Parse(text)
		if err != nil {
			return "", fmt.Errorf("cannot parse template %q: %v", text, err)
		}
		var buf bytes.Buffer
		if err := t.Execute(&buf, data); err != nil {
			return "", fmt.Errorf("error during tpl function execution for %q: %v", text, err)
		}
		return strings.ReplaceAll(buf.String(), "<no value>", ""), nil
	}
	root.Funcs(funcs)

	names := make([]string, 0, len(templates))
	for n := range templates {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if _, err := root.New(n).Parse(templates[n]); err != nil {
			return err
		}
	}

	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return err
	}
	for _, n := range names {
		base := path.Base(n)
		if strings.HasPrefix(base, "_") {
			continue // partials are only defines
		}
		// .Template as Helm sets it.
		data := map[string]interface{}{}
		for k, v := range top {
			data[k] = v
		}
		data["Template"] = map[string]interface{}{
			"Name": n, "BasePath": path.Join(chartName, "templates"),
		}
		var buf bytes.Buffer
		if err := root.ExecuteTemplate(&buf, n, data); err != nil {
			return err
		}
		out := strings.ReplaceAll(buf.String(), "<no value>", "")
		if strings.TrimSpace(out) == "" {
			continue // Helm drops empty manifests
		}
		dst := filepath.Join(outDir, filepath.FromSlash(n))
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(dst, []byte(out), 0o644); err != nil {
			return err
		}
	}
	j, err := json.MarshalIndent(values, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(outDir, "values.json"), j, 0o644)
}
