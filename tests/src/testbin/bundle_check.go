// bundle-check runs operator-framework/api's bundle validators on one
// bundle directory, the set OperatorHub's pipeline runs, and prints every
// result as JSON for the tests to read. It exits 0 whenever it could run
// the validators (the caller decides what an error means) and 2 when the
// bundle cannot even be loaded.
package main

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/operator-framework/api/pkg/manifests"
	"github.com/operator-framework/api/pkg/validation"
	"github.com/operator-framework/api/pkg/validation/errors"
)

type finding struct {
	Type   string `json:"type"`
	Field  string `json:"field,omitempty"`
	Detail string `json:"detail"`
}

type result struct {
	Validator string    `json:"validator"`
	Name      string    `json:"name"`
	Errors    []finding `json:"errors"`
	Warnings  []finding `json:"warnings"`
}

func findings(list []errors.Error) []finding {
	out := []finding{}
	for _, e := range list {
		out = append(out, finding{Type: string(e.Type), Field: e.Field, Detail: e.Error()})
	}
	return out
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: bundle-check <bundle-dir> <k8s-version>")
		os.Exit(2)
	}
	bundle, err := manifests.GetBundleFromDir(os.Args[1])
	if err != nil {
		fmt.Fprintf(os.Stderr, "cannot load the bundle in %s: %v\n", os.Args[1], err)
		os.Exit(2)
	}
	named := []struct {
		name      string
		validator interface {
			Validate(...interface{}) []errors.ManifestResult
		}
	}{
		{"default", validation.DefaultBundleValidators},
		{"operatorhub-v2", validation.OperatorHubV2Validator},
		{"standard-capabilities", validation.StandardCapabilitiesValidator},
		{"standard-categories", validation.StandardCategoriesValidator},
		{"good-practices", validation.GoodPracticesValidator},
		{"deprecated-apis", validation.AlphaDeprecatedAPIsValidator},
	}
	objs := append(bundle.ObjectsToValidate(), map[string]string{"k8s-version": os.Args[2]})
	out := []result{}
	for _, v := range named {
		for _, r := range v.validator.Validate(objs...) {
			out = append(out, result{
				Validator: v.name,
				Name:      r.Name,
				Errors:    findings(r.Errors),
				Warnings:  findings(r.Warnings),
			})
		}
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	if err := enc.Encode(out); err != nil {
		fmt.Fprintf(os.Stderr, "cannot write the results: %v\n", err)
		os.Exit(2)
	}
}
